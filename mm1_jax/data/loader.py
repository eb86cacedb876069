"""The training loader: grain over ArrayRecord sources, deterministic and checkpointable.

  per task: records (random access) -> this host's share (every n-th record)
            -> seeded shuffle, reshuffled every epoch -> decode + tokenize (threads)
  mix the tasks by their mixture rates -> expand/cut to the model's budgets
  -> pack into rows (segment ids) -> batch

Why grain: a grain iterator's position is a small JSON-able state (record indices,
not buffered data), so the trainer stores it in every checkpoint and a resumed run
continues with exactly the batches the uninterrupted run would have seen, without
re-reading anything. The seqio registry still names the tasks, their sources and the
mixture rates; tasks must have an `ArrayRecordExampleSource` (`mm1-data build` output
and the bundled corpus do). For other seqio sources, `DataConfig.loader = "tfdata"`
selects the tf.data pipeline in `pipeline.py`.

Bad records never stop training: a record that does not decode, has no text, or whose
`<image>` markers and images disagree is skipped and counted by reason; the counts are
part of the loader state and of the training metrics (`data_skipped_<reason>`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any

import numpy as np

from mm1_jax.data import chat, highres
from mm1_jax.data.tokenizer import EOS_ID, IMAGE_ID

SKIP_REASONS = ("corrupt_image", "empty_text", "image_count_mismatch", "too_short", "bad_conversation")


@dataclasses.dataclass(frozen=True)
class Skipped:
  reason: str


def _features(record: bytes) -> dict[str, list[bytes]]:
  from tensorflow.core.example import example_pb2  # noqa: PLC0415  (tensorflow: only when reading records)

  ex = example_pb2.Example.FromString(record)
  return {k: list(v.bytes_list.value) for k, v in ex.features.feature.items()}


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


def expand_and_cut(ids: np.ndarray, images: np.ndarray, max_len: int, tokens_per_image: int,
                   max_images: int, weights: np.ndarray | None = None):
  """Each `<image>` id becomes Q ids; the longest prefix within max_len ids and max_images
  images that never splits an image is kept (numpy twin of
  `preprocessors.truncate_and_expand_images`). Returns (ids, kept images, weights or None)."""
  is_img = ids == IMAGE_ID
  repeats = np.where(is_img, tokens_per_image, 1)
  keep = (np.cumsum(repeats) <= max_len) & (np.cumsum(is_img) <= max_images)
  n_keep = int(np.argmin(keep)) if not keep.all() else len(ids)
  out_weights = None if weights is None else np.repeat(weights[:n_keep], repeats[:n_keep]).astype(np.float32)
  kept = ids[:n_keep]
  return (np.repeat(kept, repeats[:n_keep]).astype(np.int32), images[:int(is_img[:n_keep].sum())],
          out_weights)


class _Prepare:
  """record bytes -> {"text": int32[L], "images": uint8[n, S, S, 3], ("weights")} or Skipped.

  Runs in grain threads. Kinds: caption, interleaved, text (pre-training; every text id
  trained) and chat (LLaVA conversations; only the assistant's ids trained).
  """

  def __init__(self, kind: str, vocabulary, image_size: int, seq_len: int, tokens_per_image: int,
               max_images: int, task_index: int = 0, subimages=None, chat_template=None):
    self.kind, self.vocab, self.image_size, self.task_index = kind, vocabulary, image_size, task_index
    self.max_len, self.max_images = seq_len + 1, max_images
    self.subimages, self.k = subimages, highres.per_image(subimages)
    self.q = tokens_per_image * self.k  # placeholders per source image
    self.template = chat_template or chat.ChatTemplate()

  def _text(self, f: dict) -> tuple[np.ndarray, np.ndarray | None, list[bytes]] | Skipped:
    if self.kind == "chat":
      try:
        turns = chat.parse(f["conversations"][0])
        ids, weights = chat.tokenize(self.vocab, turns, self.template)
      except (chat.BadConversation, KeyError, IndexError):
        return Skipped("bad_conversation")
      return ids, weights, f.get("images", [])
    if self.kind == "caption":
      text = "<image>" + f["caption"][0].decode("utf-8", "replace") + "\n"
      encoded = f["image"][:1]
    elif self.kind == "interleaved":
      text, encoded = f["text"][0].decode("utf-8", "replace"), f.get("images", [])
    else:
      text, encoded = f["text"][0].decode("utf-8", "replace"), []
    if not text.replace("<image>", "").strip():
      return Skipped("empty_text")
    return np.asarray(list(self.vocab.encode(text)) + [EOS_ID], np.int32), None, encoded

  def __call__(self, record: bytes) -> dict | Skipped:
    parsed = self._text(_features(record))
    if isinstance(parsed, Skipped):
      return parsed
    ids, weights, encoded = parsed
    if int((ids == IMAGE_ID).sum()) != len(encoded):
      return Skipped("image_count_mismatch")
    # Cut before decoding: pass image indices, so only the images that stay get decoded.
    ids, encoded_kept, weights = expand_and_cut(ids, np.arange(len(encoded)), self.max_len, self.q,
                                                self.max_images, weights)
    if len(ids) < 2 or (weights is not None and not weights[1:].any()):
      return Skipped("too_short")
    try:
      images = [decode_image(encoded[i], self.image_size, self.subimages) for i in encoded_kept]
    except (OSError, SyntaxError, ValueError):
      return Skipped("corrupt_image")
    shape = (0, self.image_size, self.image_size, 3)
    if self.subimages is not None:
      images = [sub for image in images for sub in image]  # K slots per image, in order
    out = {"text": ids, "images": np.stack(images) if images else np.zeros(shape, np.uint8),
           "task": self.task_index}
    if weights is not None:
      out["weights"] = weights
    return out


def _pack_iter_dataset(parent, seq_len: int, max_images: int, image_size: int, pack: bool,
                       skipped: collections.Counter):
  """An IterDataset of packed rows (see `pipeline.pack_examples`) with exact, JSON-able state."""
  import grain  # noqa: PLC0415  (grain: only when loading data)

  from mm1_jax.data.pipeline import PackedRow  # noqa: PLC0415  (pipeline loads tensorflow, seqio)

  class PackIterator(grain.DatasetIterator):
    def __init__(self, parent_it):
      super().__init__(parent_it)
      self._pending, self._pending_state = None, None

    def __next__(self) -> dict[str, np.ndarray]:
      row = PackedRow(seq_len, max_images, image_size)
      if self._pending is not None:
        row.add(self._pending["text"], self._pending["images"], self._pending.get("weights"))
        self._pending = None
      while True:
        before = self._parent.get_state()
        try:
          ex = next(self._parent)
        except StopIteration:
          if row.num_segments:
            return row.features()
          raise
        if isinstance(ex, Skipped):
          skipped[ex.reason] += 1
          continue
        if row.num_segments and (not pack or not row.fits(ex["text"], ex["images"])):
          # The next row starts with this example: remember where it was read from.
          self._pending, self._pending_state = ex, before
          return row.features()
        row.add(ex["text"], ex["images"], ex.get("weights"))

    def get_state(self) -> dict[str, Any]:
      parent = self._pending_state if self._pending is not None else self._parent.get_state()
      return {"parent": parent, "skipped": dict(skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
      self._parent.set_state(state["parent"])
      self._pending, self._pending_state = None, None
      skipped.clear()
      skipped.update(state.get("skipped", {}))

  class PackIterDataset(grain.IterDataset):
    def __iter__(self):
      return PackIterator(self._parent.__iter__())

  return PackIterDataset(parent)


class Loader:
  """Iterator of host-local numpy batches with `get_state` / `set_state` (JSON-able)."""

  def __init__(self, iterator, skipped: collections.Counter):
    self._it, self._skipped = iterator, skipped

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  def skipped(self) -> dict[str, int]:
    """Records skipped so far (this run and the runs it resumed), by reason."""
    return dict(self._skipped)


def mixed_examples(config, *, tokens_per_image: int, image_size: int, shard_index: int = 0,
                   num_shards: int = 1, num_epochs: int | None = None):
  """(grain MapDataset of prepared examples or Skipped, mixed by rate; the task names).

  Each example carries "task", the index of its task in the returned names.
  """
  import grain  # noqa: PLC0415  (grain: only when loading data)

  from mm1_jax.data import pipeline, sources  # noqa: PLC0415  (they load tensorflow, seqio)

  mixture = pipeline.get_mixture_or_task(config)
  tasks = [(t, mixture.get_rate(t)) for t in mixture.tasks] if hasattr(mixture, "tasks") else [(mixture, 1.0)]
  datasets, weights, names = [], [], []
  for i, (task, rate) in enumerate(tasks):
    if rate <= 0:
      continue
    src = task.source
    if not isinstance(src, sources.ArrayRecordExampleSource) or src.kind is None:
      raise ValueError(f"task {task.name!r} has a {type(src).__name__}; the grain loader reads "
                       "ArrayRecordExampleSource tasks (mm1-data build). Set DataConfig.loader='tfdata'.")
    ds = grain.MapDataset.source(src.random_access(config.split))[shard_index::num_shards]
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed * 1000 + i)
    ds = ds.repeat(num_epochs)  # reshuffled every epoch
    ds = ds.map(_Prepare(src.kind, task.output_features["text"].vocabulary, image_size, config.seq_len,
                         tokens_per_image, config.max_images, task_index=len(names),
                         subimages=config.subimages, chat_template=config.chat_template))
    datasets.append(ds)
    weights.append(rate)
    names.append(task.name)
  if not datasets:
    raise ValueError(f"{config.mixture_or_task_name!r}: every task has rate 0")
  return (grain.MapDataset.mix(datasets, weights) if len(datasets) > 1 else datasets[0]), names


def make_loader(config, *, tokens_per_image: int, image_size: int, shard_index: int = 0,
                num_shards: int = 1, num_epochs: int | None = None) -> Loader:
  """Batches of batch_size / num_shards sequences for host `shard_index` (see module doc).

  Args:
    config: a `pipeline.DataConfig`.
    tokens_per_image: Q, the connector's output tokens per image.
    image_size: the image encoder's input resolution.
    shard_index, num_shards: this host's share of every task's records.
    num_epochs: None repeats forever (each epoch reshuffled).
  """
  import grain  # noqa: PLC0415  (grain: only when loading data)

  if config.batch_size % num_shards:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_shards} hosts")
  mixed, _ = mixed_examples(config, tokens_per_image=tokens_per_image, image_size=image_size,
                            shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs)
  read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=4 * config.batch_size)
  skipped: collections.Counter = collections.Counter()
  packed = _pack_iter_dataset(mixed.to_iter_dataset(read), config.seq_len, config.image_slots, image_size,
                              config.pack, skipped)
  batched = packed.batch(config.batch_size // num_shards, drop_remainder=True)
  return Loader(iter(batched), skipped)
