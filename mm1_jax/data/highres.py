"""High-resolution images as sub-images (MM1's SFT stage).

MM1 feeds a 1344x1344 image to a 672 px encoder as five 672x672 images: an overview (the
whole image, downsized) and a 2x2 grid of crops at full resolution. Each sub-image is
encoded on its own and pooled by the connector to Q tokens, so one image costs
5 x Q tokens (720 at Q = 144). Nothing in the model changes: a sub-image is one more
image slot, and the text's `<image>` marker stands for K x Q placeholders in a row
(K = rows x cols + 1 with the overview), overview first, then the crops row by row.

Other aspect ratios are padded (centred, with `pad_value`) to the grid's aspect ratio
first, so nothing is cropped away and nothing is stretched.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SubImages:
  """Attributes:
    grid: (rows, cols) of full-resolution crops, each the encoder's input size.
    overview: also give the whole image at the encoder's size, before the crops.
    pad_value: RGB fill for padding to the grid's aspect ratio (the ImageNet mean).
  """

  grid: tuple[int, int] = (2, 2)
  overview: bool = True
  pad_value: tuple[int, int, int] = (124, 116, 104)

  def __post_init__(self):
    if len(self.grid) != 2 or min(self.grid) < 1:
      raise ValueError(f"SubImages.grid must be (rows, cols) >= 1, got {self.grid}")

  @property
  def per_image(self) -> int:
    """K: image slots one source image takes."""
    return self.grid[0] * self.grid[1] + int(self.overview)


def per_image(subimages: SubImages | None) -> int:
  return subimages.per_image if subimages is not None else 1


def pad_to_aspect(image, rows: int, cols: int, fill: tuple[int, int, int]):
  """PIL image -> PIL image padded (centred) to aspect ratio cols:rows."""
  from PIL import Image  # noqa: PLC0415  (PIL: only when images are split)

  w, h = image.size
  if w * rows == h * cols:
    return image
  if w * rows > h * cols:  # too wide: pad top and bottom
    new_w, new_h = w, -(-w * rows // cols)
  else:
    new_w, new_h = -(-h * cols // rows), h
  canvas = Image.new("RGB", (new_w, new_h), tuple(fill))
  canvas.paste(image, ((new_w - w) // 2, (new_h - h) // 2))
  return canvas


def split(image, size: int, subimages: SubImages) -> np.ndarray:
  """PIL image (RGB) -> uint8[K, size, size, 3]: the overview, then the crops row by row."""
  from PIL import Image  # noqa: PLC0415  (PIL: only when images are split)

  rows, cols = subimages.grid
  padded = pad_to_aspect(image, rows, cols, subimages.pad_value)
  big = np.asarray(padded.resize((cols * size, rows * size), Image.Resampling.BICUBIC, reducing_gap=None),
                   np.uint8)
  square = pad_to_aspect(image, 1, 1, subimages.pad_value)  # the overview is never stretched
  out = [np.asarray(square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None), np.uint8)
         ] if subimages.overview else []
  out += [big[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
  return np.stack(out)
