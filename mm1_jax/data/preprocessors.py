"""Preprocessors that turn raw multimodal records into MM1 examples.

Task side (model-agnostic, registered with seqio): every task ends in
  text:    int32[L]  token ids ending in EOS; each image is a single `<image>` id
  images:  uint8[n, H, W, 3]  the images, in the order of their `<image>` ids
  weights: float32[L]  (conversation tasks only) loss weight of each id: 1 on the
           assistant's tokens (`mm1_jax.data.chat`); other tasks train on every text id

Model side (`truncate_and_expand_images`, applied by `mm1_jax.data.pipeline`):
each `<image>` id becomes the connector's Q ids and the example is cut to the
model's sequence and image budgets.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from mm1_jax.data import chat
from mm1_jax.data.tokenizer import IMAGE_ID, IMAGE_TOKEN

OUTPUT_IMAGE_KEY = "images"


def resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8[..., h, w, 3] -> uint8[..., image_size, image_size, 3], antialiased."""
  resized = tf.image.resize(images, [image_size, image_size], antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_image(png: tf.Tensor, image_size: int) -> tf.Tensor:
  """PNG/JPEG bytes -> uint8[image_size, image_size, 3].

  Images already at the size pass through; others are resized (antialiased) so the
  shorter side is image_size, then centre-cropped to a square.
  """
  img = tf.io.decode_image(png, channels=3, expand_animations=False)
  img.set_shape([None, None, 3])
  shape = tf.shape(img)
  same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
  img = tf.cond(same, lambda: img, lambda: resize_and_crop(img, image_size))
  return tf.ensure_shape(img, [image_size, image_size, 3])


def resize_and_crop(img: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8[h, w, 3] -> uint8[image_size, image_size, 3]: shorter side to size, centre crop."""
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  scale = image_size / tf.reduce_min(hw)
  new_hw = tf.maximum(tf.cast(tf.math.ceil(hw * scale), tf.int32), image_size)
  resized = tf.image.resize(img, new_hw, antialias=True)
  cropped = tf.image.resize_with_crop_or_pad(resized, image_size, image_size)
  return tf.cast(tf.clip_by_value(tf.round(cropped), 0, 255), tf.uint8)


@seqio.map_over_dataset
def caption_to_text(ex, image_size: int = 64):
  """A caption pair becomes `<image>{caption}\\n`."""
  return {"text": tf.strings.join([IMAGE_TOKEN, ex["caption"], "\n"]),
          OUTPUT_IMAGE_KEY: decode_image(ex["image"], image_size)[None]}


@seqio.map_over_dataset
def interleaved_to_text(ex, image_size: int = 64):
  """An interleaved document keeps its text; its images are decoded in order."""
  images = tf.map_fn(lambda b: decode_image(b, image_size), ex["images"],
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))
  return {"text": ex["text"], OUTPUT_IMAGE_KEY: images}


@seqio.map_over_dataset
def text_only(ex, image_size: int = 64):
  return {"text": ex["text"], OUTPUT_IMAGE_KEY: tf.zeros([0, image_size, image_size, 3], tf.uint8)}


@seqio.map_over_dataset
def check_image_count(ex):
  """Fails loudly if a record's `<image>` markers and its images disagree."""
  n_markers = tf.reduce_sum(tf.cast(tf.equal(ex["text"], IMAGE_ID), tf.int32))
  n_images = tf.shape(ex[OUTPUT_IMAGE_KEY])[0]
  tf.debugging.assert_equal(n_markers, n_images, message="<image> markers and images differ")
  return ex


def chat_to_ids(ex, vocabulary, image_size: int = 64, template=None):
  """A conversation record (images, LLaVA "conversations" JSON) -> text ids, weights, images.

  Tokenized here rather than by seqio's `tokenize`: the loss mask comes from where each
  token falls in the rendered chat (`mm1_jax.data.chat.tokenize`).
  """
  template = template or chat.ChatTemplate()

  def tok(conversations):
    ids, weights = chat.tokenize(vocabulary, chat.parse(conversations), template)
    return ids.astype("int32"), weights.astype("float32")

  @seqio.map_over_dataset
  def fn(ex):
    ids, weights = tf.numpy_function(tok, [ex["conversations"]], [tf.int32, tf.float32], stateful=False)
    images = tf.map_fn(lambda b: decode_image(b, image_size), ex["images"],
                       fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))
    return {"text": tf.ensure_shape(ids, [None]), "weights": tf.ensure_shape(weights, [None]),
            OUTPUT_IMAGE_KEY: images}

  return fn(ex)


def chat_task_preprocessors(vocabulary, image_size: int, template=None):
  """The chain of conversation tasks: records -> (text ids + EOS, weights, images)."""
  return [functools.partial(chat_to_ids, vocabulary=vocabulary, image_size=image_size, template=template),
          check_image_count]


def task_preprocessors(to_text, image_size: int):
  """The chain shared by the pre-training tasks: records -> (text ids + EOS, images)."""
  return [
      functools.partial(to_text, image_size=image_size),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos,
      check_image_count,
  ]


def truncate_and_expand_images(ex: dict, max_len: int, tokens_per_image: int, max_images: int,
                               image_size: int) -> dict:
  """Cuts an example to the model's budgets and expands each `<image>` id to Q ids.

  The cut is a prefix that never splits an image: an image whose Q tokens do not
  fit in max_len, or beyond max_images, is dropped together with all that follows.
  Images are resized when the model's resolution differs from the task's.
  """
  tokens = ex["text"]
  is_img = tf.equal(tokens, IMAGE_ID)
  repeats = tf.where(is_img, tokens_per_image, 1)
  cum = tf.cumsum(repeats)  # expanded length up to and including each token
  img_ordinal = tf.cumsum(tf.cast(is_img, tf.int32))
  keep = tf.logical_and(cum <= max_len, img_ordinal <= max_images)
  n_keep = tf.reduce_sum(tf.cast(keep, tf.int32))
  kept = tokens[:n_keep]
  expanded = tf.repeat(kept, repeats[:n_keep])
  n_images = tf.reduce_sum(tf.cast(tf.equal(kept, IMAGE_ID), tf.int32))
  images = ex[OUTPUT_IMAGE_KEY][:n_images]
  if images.shape[1] != image_size or images.shape[2] != image_size:
    images = resize_uint8(images, image_size)
  out = {"text": expanded, OUTPUT_IMAGE_KEY: images}
  if "weights" in ex:
    out["weights"] = tf.repeat(ex["weights"][:n_keep], repeats[:n_keep])
  return out
