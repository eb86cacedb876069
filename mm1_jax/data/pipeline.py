"""From a seqio mixture or task to fixed-shape MM1 training batches.

This is the model-specific half of the data path (seqio's feature-converter role):
it expands image placeholders to the connector's token count, cuts examples to the
sequence and image budgets, shifts inputs/targets and pads everything to static
shapes. The output layout is documented in `mm1_jax.model`.

Imports tensorflow and seqio; the model and train-step modules do not, so they run
where only jax is installed.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax.data import preprocessors as prep
from mm1_jax.data.tokenizer import IMAGE_ID, PAD_ID

# tf.data only runs input pipelines here; keep it off any accelerator jax uses.
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to batch it.

  Attributes:
    mixture_or_task_name: a registered seqio mixture or task.
    split: split to read.
    batch_size: global batch size (sequences per step, all hosts together).
    seq_len: model input length T.
    max_images: image slots per sequence N.
    mixture_rates: {task_name: rate} to sample instead of the registered rates.
    seed: shuffle and mixture-sampling seed; the same seed gives the same batches.
    module_imports: modules imported first so that their tasks get registered.
  """

  mixture_or_task_name: str = "mm1_shapes_pretrain"
  split: str = "train"
  batch_size: int = 16
  seq_len: int = 128
  max_images: int = 3
  mixture_rates: Mapping[str, float] | None = None
  seed: int = 0
  shuffle: bool = True
  module_imports: tuple[str, ...] = ("tasks",)


def get_mixture_or_task(config: DataConfig) -> seqio.Task | seqio.Mixture:
  for module in config.module_imports:
    importlib.import_module(module)
  if config.mixture_rates:
    return seqio.Mixture(f"{config.mixture_or_task_name}_rates_override",
                         list(dict(config.mixture_rates).items()))
  return seqio.get_mixture_or_task(config.mixture_or_task_name)


def to_model_features(ex: dict, seq_len: int, tokens_per_image: int, max_images: int,
                      image_size: int) -> dict:
  """One task example -> fixed-shape model features (see `mm1_jax.model`)."""
  ex = prep.truncate_and_expand_images(ex, seq_len + 1, tokens_per_image, max_images, image_size)
  text = ex["text"]
  n = tf.size(text)
  seq = tf.pad(text, [[0, seq_len + 1 - n]], constant_values=PAD_ID)
  tokens, targets = seq[:-1], seq[1:]
  idx = tf.range(seq_len)
  has_target = idx < n - 1
  images = ex[prep.OUTPUT_IMAGE_KEY]
  images = tf.pad(images, [[0, max_images - tf.shape(images)[0]], [0, 0], [0, 0], [0, 0]])
  return {
      "tokens": tf.cast(tokens, tf.int32),
      "targets": tf.cast(tf.where(has_target, targets, PAD_ID), tf.int32),
      "loss_weights": tf.cast(tf.logical_and(has_target, targets != IMAGE_ID), tf.float32),
      "segment_ids": tf.cast(idx < n, tf.int32),
      "positions": idx,
      "images": tf.ensure_shape(images, [max_images, image_size, image_size, 3]),
  }


def make_dataset(config: DataConfig, *, tokens_per_image: int, image_size: int,
                 shard_index: int = 0, num_shards: int = 1, start_batch: int = 0,
                 num_epochs: int | None = None) -> tf.data.Dataset:
  """Batches for one host: batch_size / num_shards sequences each.

  Args:
    config: what to read.
    tokens_per_image: Q, the connector's output tokens per image.
    image_size: the image encoder's input resolution.
    shard_index, num_shards: this host's share of the data.
    start_batch: batches to skip, to resume where a checkpoint left off.
    num_epochs: None repeats forever.
  """
  if config.batch_size % num_shards:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_shards} hosts")
  source = get_mixture_or_task(config)
  shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  ds = source.get_dataset(sequence_length=None, split=config.split, shuffle=config.shuffle,
                          seed=config.seed, shard_info=shard_info, num_epochs=num_epochs,
                          trim_output_features=False, use_cached=False)
  ds = ds.map(lambda ex: to_model_features(ex, config.seq_len, tokens_per_image, config.max_images,
                                           image_size), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(config.batch_size // num_shards, drop_remainder=True)
  if start_batch:
    ds = ds.skip(start_batch)
  return ds.prefetch(2)


def iterate(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches, images kept as uint8."""
  return ds.as_numpy_iterator()
