"""From a seqio mixture or task to fixed-shape MM1 training batches.

This is the model-specific half of the data path (seqio's feature-converter role):
it expands image placeholders to the connector's token count, cuts examples to the
sequence and image budgets, packs several examples into each sequence (segment ids
keep them apart), shifts inputs/targets and pads everything to static shapes. The
output layout is documented in `mm1_jax.model`.

Imports tensorflow and seqio; the model and train-step modules do not, so they run
where only jax is installed.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax.data import documents, highres
from mm1_jax.data import preprocessors as prep
from mm1_jax.data import sources
from mm1_jax.data import vocabulary as vocab_lib

# tf.data only runs input pipelines here; keep it off any accelerator jax uses.
tf.config.set_visible_devices([], "GPU")


RATE_UNITS = ("records", "tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to batch it.

  Attributes:
    mixture_or_task_name: a registered seqio mixture or task.
    split: split to read.
    batch_size: global batch size (sequences per step, all hosts together).
    seq_len: model input length T.
    max_images: image slots per sequence N.
    mixture_rates: {task_name: rate} to sample the named mixture's tasks at instead
      of its registered rates; must name exactly that mixture's tasks.
    seed: shuffle and mixture-sampling seed; the same seed gives the same batches.
    pack: pack several examples into each sequence (attention stays within each).
    pack_rows: rows open at once while packing (`Packer`: first fit, the fullest row
      emitted when an example fits none); 1 is next-fit. More rows usually pad less, at
      the cost of a longer replay when a grain loader resumes (at most 32 x pack_rows + 1
      examples; with one row, the examples of that row). A loader's state is for the
      pack_rows it was saved with.
    module_imports: modules imported first so that their tasks get registered.
    corpora: built corpora (`mm1_jax.data.sources.Corpus`: folder and tokenizer, set in
      gin) registered as tasks next, before the mixture or task is looked up.
    loader: "grain" (`mm1_jax.data.loader`: checkpointable, ArrayRecord sources) or
      "tfdata" (`make_dataset` here: any seqio source; resumes by re-reading).
    num_threads: grain threads that read and decode records.
    subimages: high resolution (`mm1_jax.data.highres.SubImages`): each image becomes
      an overview and a grid of crops, K image slots and K x Q placeholders (grain
      loader only). max_images still counts source images.
    chat_template: how conversation tasks are rendered (`mm1_jax.data.chat.ChatTemplate`;
      None: its defaults). The evaluator takes the same one for chat prompts.
    split_documents: a pre-training record longer than one sequence (more ids, once each
      `<image>` is tokens_per_image ids, than seq_len + 1, or more than max_images
      images) continues into further examples instead of being cut (both loaders; see
      `documents.chunk_bounds`). Conversations are always cut to their first sequence.
    rate_unit: what the mixture rates divide: "records" (each task's share of the records
      drawn) or "tokens" (its share of the ids fed to the model: each task's rate is
      divided by its mean ids per record, estimated from `rate_sample` records of the
      task, seeded, before training; printed, and in `mm1-data inspect`'s report).
    rate_sample: records read per task for the rate_unit="tokens" estimate.
  """

  mixture_or_task_name: str = "mm1_shapes_pretrain"
  split: str = "train"
  batch_size: int = 16
  seq_len: int = 4096  # MM1: 4096 tokens and up to 16 images a sequence
  max_images: int = 16
  mixture_rates: Mapping[str, float] | None = None
  seed: int = 0
  shuffle: bool = True
  pack: bool = True
  pack_rows: int = 1
  module_imports: tuple[str, ...] = ("tasks",)
  corpora: tuple[Any, ...] = ()
  loader: str = "grain"
  num_threads: int = 4
  subimages: Any = None
  chat_template: Any = None
  split_documents: bool = True
  rate_unit: str = "records"
  rate_sample: int = 256

  def __post_init__(self):
    if self.rate_unit not in RATE_UNITS:
      raise ValueError(f"DataConfig.rate_unit must be one of {RATE_UNITS}, got {self.rate_unit!r}")
    if self.pack_rows < 1:
      raise ValueError(f"DataConfig.pack_rows must be >= 1, got {self.pack_rows}")
    if self.rate_sample < 1:
      raise ValueError(f"DataConfig.rate_sample must be >= 1, got {self.rate_sample}")
    if self.loader not in ("grain", "tfdata"):
      raise ValueError(f"DataConfig.loader must be 'grain' or 'tfdata', got {self.loader!r}")
    if self.subimages is not None and self.loader != "grain":
      raise ValueError("DataConfig.subimages (high-resolution sub-images) needs loader = 'grain'")

  @property
  def image_slots(self) -> int:
    """Image slots per sequence: max_images x the sub-images each image takes."""
    return self.max_images * highres.per_image(self.subimages)


def get_mixture_or_task(config: DataConfig) -> seqio.Task | seqio.Mixture:
  for module in config.module_imports:
    importlib.import_module(module)
  sources.register_all(config.corpora)
  source = seqio.get_mixture_or_task(config.mixture_or_task_name)
  if not config.mixture_rates:
    return source
  rates = dict(config.mixture_rates)
  registered = {t.name for t in getattr(source, "tasks", ())}
  if set(rates) != registered:
    raise ValueError(
        f"mixture_rates {sorted(rates)} must name exactly the tasks of mixture "
        f"{config.mixture_or_task_name!r} ({sorted(registered) or 'it is a task, not a mixture'}); "
        "set MIXTURE_RATES = None to use the registered rates")
  return seqio.Mixture(f"{config.mixture_or_task_name}_rates_override", list(rates.items()))


def special_ids_of(source: seqio.Task | seqio.Mixture) -> vocab_lib.SpecialIds:
  """The image / EOS / pad ids of a task's vocabulary (`vocabulary.special_ids`); the tasks
  of a mixture must agree on them (they are packed into the same rows)."""
  tasks = list(getattr(source, "tasks", [source]))
  found = {}
  for task in tasks:
    ids = vocab_lib.special_ids(task.output_features["text"].vocabulary)
    found.setdefault((ids.image, ids.eos, ids.pad, ids.size, ids.stops), (task.name, ids))
  if len(found) > 1:
    raise ValueError(f"the tasks of {source.name!r} use different vocabularies (image, eos, pad ids, size, "
                     f"stops): {', '.join(f'{n}: {k[:4]}' for k, (n, _) in found.items())}")
  return next(iter(found.values()))[1]


class PackedRow:
  """One packed sequence being filled: (input, target) pairs and image slots.

  image_id: the vocabulary's `<image>` id (no loss on predicting it); pad_id: the value
  written at padding positions (always masked).
  """

  def __init__(self, seq_len: int, max_images: int, image_size: int, *, image_id: int, pad_id: int):
    self.image_id = image_id
    self.tokens = np.full(seq_len, pad_id, np.int32)
    self.targets = np.full(seq_len, pad_id, np.int32)
    self.loss_weights = np.zeros(seq_len, np.float32)
    self.segment_ids = np.zeros(seq_len, np.int32)
    self.positions = np.zeros(seq_len, np.int32)
    self.images = np.zeros((max_images, image_size, image_size, 3), np.uint8)
    self.used = self.num_images = self.num_segments = 0

  def fits(self, text: np.ndarray, images: np.ndarray) -> bool:
    return (self.used + len(text) - 1 <= len(self.tokens)
            and self.num_images + len(images) <= len(self.images))

  def add(self, text: np.ndarray, images: np.ndarray, weights: np.ndarray | None = None) -> None:
    """weights: the loss weight of each text id (conversations: 1 on the assistant's), else all 1."""
    n = len(text) - 1
    span = slice(self.used, self.used + n)
    self.num_segments += 1
    self.tokens[span], self.targets[span] = text[:-1], text[1:]
    self.loss_weights[span] = (text[1:] != self.image_id) * (1.0 if weights is None else weights[1:])
    self.segment_ids[span] = self.num_segments
    self.positions[span] = np.arange(n)
    self.images[self.num_images:self.num_images + len(images)] = images
    self.used += n
    self.num_images += len(images)

  def features(self) -> dict[str, np.ndarray]:
    return {k: getattr(self, k) for k in
            ("tokens", "targets", "loss_weights", "segment_ids", "positions", "images")}

  def fullness(self) -> float:
    """The larger of the shares of positions and of image slots in use."""
    return max(self.used / len(self.tokens), self.num_images / max(len(self.images), 1))


class Packer:
  """First-fit packing over `rows` open rows, two budgets each: positions and image slots.

  An example goes into the first open row with room for its (input, target) pairs and its
  images, else into a free slot; with every slot taken, the fullest row (`PackedRow.fullness`)
  is emitted and the example starts a new row in its slot. A row open for more than
  `max_age` examples (default 32 x rows; none with one row, which holds at most seq_len
  examples) is emitted before the next is placed, which bounds how far back a loader's
  checkpoint must replay (`loader._pack_iter_dataset`). rows=1 is next-fit: a row is
  emitted as soon as an example does not fit it. With pack=False each row holds one
  example.

  Next-fit pads whatever a row cannot take: the example that does not fit goes to the next
  row, and the gap it leaves stays empty. More open rows let later, smaller examples fill
  those gaps; when the image cap ends rows before their positions do, nothing does
  (benchmarks/packing.py measures the padding by data set and rows).
  """

  def __init__(self, seq_len: int, max_images: int, image_size: int, *, image_id: int, pad_id: int,
               rows: int = 1, pack: bool = True, max_age: int | None = None):
    if rows < 1:
      raise ValueError(f"packing needs at least one open row, got {rows}")
    self._new = lambda: PackedRow(seq_len, max_images, image_size, image_id=image_id, pad_id=pad_id)  # noqa: E731
    self.pack = pack
    self.rows: list[PackedRow | None] = [None] * (rows if pack else 1)
    self.born = [0] * len(self.rows)  # example count when each slot's row was started
    self.count = 0  # examples placed so far
    # One row needs no limit: it holds at most seq_len examples.
    self.max_age = max_age if max_age is not None else (32 * rows if len(self.rows) > 1 else None)

  def overdue(self) -> int | None:
    """The slot of the oldest row open longer than max_age examples, or None."""
    if self.max_age is None:
      return None
    late = [i for i, r in enumerate(self.rows) if r is not None and self.count - self.born[i] > self.max_age]
    return min(late, key=lambda i: self.born[i]) if late else None

  def take(self, slot: int) -> dict[str, np.ndarray]:
    """Emits the row in `slot` and frees it."""
    row, self.rows[slot] = self.rows[slot], None
    return row.features()

  def place(self, text: np.ndarray, images: np.ndarray, weights: np.ndarray | None = None,
            slot: int | None = None) -> tuple[int, dict[str, np.ndarray] | None]:
    """Adds one example; returns (its slot, the row emitted to make room or None). `slot`
    forces the slot (a loader's replay of a checkpoint), which must be open or free."""
    emitted = None
    if slot is None:
      fits = [i for i, r in enumerate(self.rows) if r is not None and self.pack and r.fits(text, images)]
      free = [i for i, r in enumerate(self.rows) if r is None]
      if fits:
        slot = fits[0]
      elif free:
        slot = free[0]
      else:
        slot = max(range(len(self.rows)), key=lambda i: self.rows[i].fullness())
        emitted = self.take(slot)
    if self.rows[slot] is None:
      self.rows[slot], self.born[slot] = self._new(), self.count
    self.rows[slot].add(text, images, weights)
    self.count += 1
    return slot, emitted

  def flush(self) -> Iterator[dict[str, np.ndarray]]:
    """The open rows, oldest first, each emitted."""
    for slot in sorted((i for i, r in enumerate(self.rows) if r is not None), key=lambda i: self.born[i]):
      yield self.take(slot)


def pack_examples(examples: Iterable[dict], seq_len: int, max_images: int, image_size: int,
                  pack: bool = True, *, image_id: int, pad_id: int,
                  stats: collections.Counter | None = None, rows: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Examples (already cut to seq_len + 1 ids and max_images) -> fixed-shape rows.

  First-fit packing over `rows` open rows (`Packer`; rows=1 is next-fit). Every example
  keeps its own segment id and positions from 0, so attention never crosses examples (see
  `model.segment_causal_mask`). With pack=False each row holds one example.
  image_id, pad_id: the vocabulary's (`special_ids_of`). stats: counts "documents_split"
  and "chunks" from the examples' "chunk" / "chunks" (`preprocessors.split_and_expand_images`).
  """
  packer = Packer(seq_len, max_images, image_size, image_id=image_id, pad_id=pad_id, rows=rows, pack=pack)
  for ex in examples:
    if stats is not None and int(ex.get("chunk", 0)) == 0 and int(ex.get("chunks", 1)) > 1:
      stats["documents_split"] += 1
      stats["chunks"] += int(ex["chunks"])
    text, images = ex["text"], ex[prep.OUTPUT_IMAGE_KEY]
    if len(text) < 2:  # nothing to predict
      continue
    late = packer.overdue()
    if late is not None:
      yield packer.take(late)
    _, emitted = packer.place(text, images, ex.get("weights"))
    if emitted is not None:
      yield emitted
  yield from packer.flush()


def token_estimate(source: seqio.Mixture, config: DataConfig, *, tokens_per_image: int) -> dict[str, dict]:
  """Per task of a mixture (tf.data path): its rate, its mean tokens per record
  (`documents.record_tokens`) over up to config.rate_sample records (the first of a seeded
  shuffle, all hosts alike), and the record rate ("weight") that makes its share of
  tokens follow its rate. Printed."""
  report = {}
  for task in source.tasks:
    rate = float(source.get_rate(task))
    if rate <= 0:
      continue
    image_id = vocab_lib.special_ids(task.output_features["text"].vocabulary).image
    ds = task.get_dataset(sequence_length=None, split=config.split, shuffle=True, seed=config.seed,
                          num_epochs=1, trim_output_features=False, use_cached=False)
    lengths = []
    for ex in ds.take(config.rate_sample).as_numpy_iterator():
      split = config.split_documents and "weights" not in ex
      chunks = documents.split_document(ex["text"], config.seq_len + 1, tokens_per_image, config.max_images,
                                         image_id=image_id, split=split)
      lengths.append(documents.record_tokens([c[0] for c in chunks]))
    if not any(lengths):  # an empty record counts 0 in the mean: the mixture draws it all the same
      raise ValueError(f"rate_unit='tokens': none of the first {config.rate_sample} records of task "
                       f"{task.name!r} is usable, so its tokens per record cannot be estimated")
    mean = float(np.mean(lengths))
    report[task.name] = {"rate": rate, "mean_tokens_per_record": mean, "records_sampled": len(lengths),
                         "weight": rate / mean}
  total_rate, total_weight = (sum(r[k] for r in report.values()) for k in ("rate", "weight"))
  for name, r in report.items():
    r["rate"] /= total_rate
    r["weight"] /= total_weight
    print(f"data: rate_unit=tokens: {name}: {r['mean_tokens_per_record']:.1f} tokens per record "
          f"(over {r['records_sampled']} records), token rate {r['rate']:.3f} -> record rate "
          f"{r['weight']:.3f}", flush=True)
  return report


def make_dataset(config: DataConfig, *, tokens_per_image: int, image_size: int,
                 shard_index: int = 0, num_shards: int = 1, start_batch: int = 0,
                 num_epochs: int | None = None, stats: collections.Counter | None = None) -> tf.data.Dataset:
  """Batches for one host: batch_size / num_shards sequences each.

  Args:
    config: what to read.
    tokens_per_image: Q, the connector's output tokens per image.
    image_size: the image encoder's input resolution.
    shard_index, num_shards: this host's share of the data.
    start_batch: batches to skip, to resume where a checkpoint left off.
    num_epochs: None repeats forever.
    stats: if given, counts "documents_split" (records longer than one sequence) and
      "chunks" (the examples they became) as the rows are packed (ahead of the batches
      consumed by the prefetch).
  """
  if config.batch_size % num_shards:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_shards} hosts")
  source = get_mixture_or_task(config)
  ids = special_ids_of(source)
  if config.rate_unit == "tokens" and len(getattr(source, "tasks", ())) > 1:
    estimate = token_estimate(source, config, tokens_per_image=tokens_per_image)
    source = seqio.Mixture(f"{source.name}_per_token", [(n, r["weight"]) for n, r in estimate.items()])
  shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  ds = source.get_dataset(sequence_length=None, split=config.split, shuffle=config.shuffle,
                          seed=config.seed, shard_info=shard_info, num_epochs=num_epochs,
                          trim_output_features=False, use_cached=False)
  examples = ds.map(lambda ex: prep.plan_chunks(
      ex, config.seq_len + 1, tokens_per_image, config.max_images, image_size, image_id=ids.image,
      split=config.split_documents and "weights" not in ex), num_parallel_calls=tf.data.AUTOTUNE)
  examples = examples.flat_map(lambda ex: prep.chunks_of(ex, tokens_per_image, image_id=ids.image)).prefetch(64)
  t, n = config.seq_len, config.max_images
  signature = {k: tf.TensorSpec([t], tf.float32 if k == "loss_weights" else tf.int32)
               for k in ("tokens", "targets", "loss_weights", "segment_ids", "positions")}
  signature["images"] = tf.TensorSpec([n, image_size, image_size, 3], tf.uint8)
  ds = tf.data.Dataset.from_generator(
      lambda: pack_examples(examples.as_numpy_iterator(), t, n, image_size, config.pack, image_id=ids.image,
                            pad_id=ids.pad, stats=stats, rows=config.pack_rows),
      output_signature=signature)
  ds = ds.batch(config.batch_size // num_shards, drop_remainder=True)
  if start_batch:
    ds = ds.skip(start_batch)
  return ds.prefetch(2)


def iterate(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches, images kept as uint8."""
  return ds.as_numpy_iterator()
