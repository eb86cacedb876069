"""Preprocessors that turn raw multimodal records into MM1 examples.

Task side (model-agnostic, registered with seqio): every task ends in
  text:    int32[L]  token ids ending in EOS; each image is a single `<image>` id
  images:  uint8[n, H, W, 3]  the images, in the order of their `<image>` ids
  weights: float32[L]  (conversation tasks only) loss weight of each id: 1 on the
           assistant's tokens (`mm1_jax.data.chat`); other tasks train on every text id

Model side (`plan_chunks` and `chunks_of`, applied by `mm1_jax.data.pipeline`): each
`<image>` id becomes the connector's Q ids, and a record longer than the model's sequence
and image budgets is split into consecutive examples that fit (`documents.chunk_bounds`;
conversations are cut to the first). `truncate_and_expand_images` is the cut alone.

Ids come from the task's vocabulary (`mm1_jax.data.vocabulary.special_ids`), never constants.
"""

from __future__ import annotations

import functools

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax.data import chat, documents
from mm1_jax.data import images as images_lib
from mm1_jax.data import vocabulary as vocab_lib
from mm1_jax.data.vocabulary import IMAGE_TOKEN

OUTPUT_IMAGE_KEY = "images"


def resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8[..., h, w, 3] -> uint8[..., image_size, image_size, 3], antialiased."""
  resized = tf.image.resize(images, [image_size, image_size], antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_image(data: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded bytes -> uint8[image_size, image_size, 3] by `mm1_jax.data.images.decode_image`
  (PIL: shorter side resized bicubic, centre crop), the grain loader's own function, so
  both loaders give the same pixels for a record."""
  def decode(b):  # a 0-d object array or numpy bytes, as tf hands a scalar string over
    return images_lib.decode_image(b.item() if isinstance(b, np.ndarray) else bytes(b), image_size)

  pixels = tf.numpy_function(decode, [data], tf.uint8, stateful=False)
  return tf.ensure_shape(pixels, [image_size, image_size, 3])


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
def check_image_count(ex, output_features):
  """Fails loudly if a record's `<image>` markers and its images disagree. seqio passes the
  task's output_features: the `<image>` id is its text vocabulary's."""
  image_id = vocab_lib.special_ids(output_features["text"].vocabulary).image
  n_markers = tf.reduce_sum(tf.cast(tf.equal(ex["text"], image_id), tf.int32))
  n_images = tf.shape(ex[OUTPUT_IMAGE_KEY])[0]
  tf.debugging.assert_equal(n_markers, n_images, message="<image> markers and images differ")
  return ex


def chat_to_ids(ex, vocabulary, image_size: int = 64, template=None):
  """A conversation record (images, LLaVA "conversations" JSON) -> text ids, weights, images.

  Tokenized here rather than by seqio's `tokenize`: the loss mask comes from where each
  token falls in the rendered chat (`mm1_jax.data.chat.tokenize`).
  """
  template = template or chat.ChatTemplate()
  eos_id = vocab_lib.special_ids(vocabulary).eos

  def tok(conversations):
    ids, weights = chat.tokenize(vocabulary, chat.parse(conversations), template, eos_id=eos_id)
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
                               image_size: int, *, image_id: int) -> dict:
  """Cuts an example to the model's budgets and expands each `<image>` id to Q ids.

  The cut is a prefix that never splits an image: an image whose Q tokens do not
  fit in max_len, or beyond max_images, is dropped together with all that follows.
  Images are resized when the model's resolution differs from the task's. image_id: the
  vocabulary's `<image>` id.
  """
  tokens = ex["text"]
  is_img = tf.equal(tokens, image_id)
  repeats = tf.where(is_img, tokens_per_image, 1)
  cum = tf.cumsum(repeats)  # expanded length up to and including each token
  img_ordinal = tf.cumsum(tf.cast(is_img, tf.int32))
  keep = tf.logical_and(cum <= max_len, img_ordinal <= max_images)
  n_keep = tf.reduce_sum(tf.cast(keep, tf.int32))
  kept = tokens[:n_keep]
  expanded = tf.repeat(kept, repeats[:n_keep])
  n_images = tf.reduce_sum(tf.cast(tf.equal(kept, image_id), tf.int32))
  images = ex[OUTPUT_IMAGE_KEY][:n_images]
  if images.shape[1] != image_size or images.shape[2] != image_size:
    images = resize_uint8(images, image_size)
  out = {"text": expanded, OUTPUT_IMAGE_KEY: images}
  if "weights" in ex:
    out["weights"] = tf.repeat(ex["weights"][:n_keep], repeats[:n_keep])
  return out


def plan_chunks(ex: dict, max_len: int, tokens_per_image: int, max_images: int, image_size: int, *,
                image_id: int, split: bool = True) -> dict:
  """Adds "bounds", int32[k, 4]: per example the record becomes, [first id, end id, first
  image, end image) of the record's ids and images (`documents.chunk_bounds`: each fits
  max_len ids once expanded and max_images images, never splits an image, and they follow
  one another; split=False keeps only the first). Images are resized here when the model's
  resolution differs from the task's. Parallel half of the split; `chunks_of` does the rest."""
  def bounds(tokens: np.ndarray) -> np.ndarray:
    is_image = tokens == image_id
    before = np.concatenate([[0], np.cumsum(is_image)])
    out = [(a, b, before[a], before[b])
           for a, b in documents.chunk_bounds(is_image, max_len, tokens_per_image, max_images, split)]
    return np.asarray(out, np.int32).reshape(-1, 4)

  out = dict(ex)
  out["bounds"] = tf.ensure_shape(tf.numpy_function(bounds, [ex["text"]], tf.int32, stateful=False), [None, 4])
  images = ex[OUTPUT_IMAGE_KEY]
  if images.shape[1] != image_size or images.shape[2] != image_size:
    out[OUTPUT_IMAGE_KEY] = resize_uint8(images, image_size)
  return out


def chunks_of(ex: dict, tokens_per_image: int, *, image_id: int) -> tf.data.Dataset:
  """A `plan_chunks` record -> a dataset of its examples, in order: text (each `<image>`
  id repeated tokens_per_image times), images, weights (conversations), and "chunk" /
  "chunks" (its index, how many the record became) for the counts."""
  bounds = ex["bounds"]
  count = tf.shape(bounds)[0]

  def one(index, b):
    text = ex["text"][b[0]:b[1]]
    repeats = tf.where(tf.equal(text, image_id), tokens_per_image, 1)
    out = {"text": tf.repeat(text, repeats), OUTPUT_IMAGE_KEY: ex[OUTPUT_IMAGE_KEY][b[2]:b[3]],
           "chunk": index, "chunks": count}
    if "weights" in ex:
      out["weights"] = tf.repeat(ex["weights"][b[0]:b[1]], repeats)
    return out

  return tf.data.Dataset.from_tensor_slices((tf.range(count), bounds)).map(one)
