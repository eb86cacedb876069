"""Encoded image bytes -> model pixels: the one resize both loaders and the evaluator use.

`decode_image` decodes with PIL, resizes the shorter side to the model's resolution with
bicubic resampling and centre-crops a square. The grain loader and the evaluator call it
directly; the tf.data loader calls it through `tf.numpy_function`
(`preprocessors.decode_image`), so a record gives the same pixels, bit for bit, on either
loader. No TensorFlow here: the evaluator imports it on machines without it.
"""

from __future__ import annotations

import io

import numpy as np

from mm1_jax.data import highres


def decode_image(data: bytes, image_size: int, subimages=None) -> np.ndarray:
  """Encoded bytes -> uint8[image_size, image_size, 3]: shorter side resized, centre crop.

  With `subimages` (`highres.SubImages`): uint8[K, image_size, image_size, 3], the
  overview and the crops of the whole image, padded to the grid's aspect ratio.
  """
  from PIL import Image  # noqa: PLC0415  (PIL: only when decoding images)

  with Image.open(io.BytesIO(data)) as im:
    im = im.convert("RGB")
    if subimages is not None:
      return highres.split(im, image_size, subimages)
    w, h = im.size
    if (w, h) != (image_size, image_size):
      scale = image_size / min(w, h)
      nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
      im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
      left, top = (nw - image_size) // 2, (nh - image_size) // 2
      im = im.crop((left, top, left + image_size, top + image_size))
    return np.asarray(im, np.uint8)
