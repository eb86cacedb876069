"""The training loader: grain over ArrayRecord sources, deterministic and checkpointable.

  per task: records (random access) -> this host's share (every n-th record)
            -> seeded shuffle, reshuffled every epoch -> decode + tokenize, expand each
               `<image>` and split a record longer than one sequence into examples (threads)
  mix the tasks by their mixture rates (per record, or per token: `DataConfig.rate_unit`)
  -> pack the examples into rows (segment ids) -> batch

Why grain: a grain iterator's position is a small JSON-able state (record indices,
not buffered data), so the trainer stores it in every checkpoint and a resumed run
continues with exactly the batches the uninterrupted run would have seen, without
re-reading anything. The seqio registry still names the tasks, their sources and the
mixture rates; tasks must have a `sources.RandomAccessRecords` source (`mm1-data build` output
and the bundled corpus do). For other seqio sources, `DataConfig.loader = "tfdata"`
selects the tf.data pipeline in `pipeline.py`.

Bad records never stop training: a record that does not decode, has no text, or whose
`<image>` markers and images disagree is skipped and counted by reason; the counts are
part of the loader state and of the training metrics (`data_skipped_<reason>`). Long
documents split into several examples are counted too (`Loader.stats()`, in the state).

Ids (`<image>`, EOS, padding) come from each task's vocabulary (`vocabulary.special_ids`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from mm1_jax.data import chat, highres
from mm1_jax.data.documents import record_tokens, split_document
from mm1_jax.data.images import decode_image

SKIP_REASONS = ("corrupt_image", "empty_text", "image_count_mismatch", "too_short", "bad_conversation")


@dataclasses.dataclass(frozen=True)
class Skipped:
  reason: str


def _features(record: bytes) -> dict[str, list[bytes]]:
  from tensorflow.core.example import example_pb2  # noqa: PLC0415  (tensorflow: only when reading records)

  ex = example_pb2.Example.FromString(record)
  return {k: list(v.bytes_list.value) for k, v in ex.features.feature.items()}


class _Prepare:
  """record bytes -> a list of examples {"text": int32[L], "images": uint8[n, S, S, 3],
  "task", ("weights")}, or Skipped.

  Runs in grain threads. Kinds: caption, interleaved, text (pre-training; every text id
  trained) and chat (LLaVA conversations; only the assistant's ids trained). A pre-training
  document longer than one sequence (split_documents) becomes several examples, in order
  (`chunk_bounds`); a conversation is cut to its first sequence.
  """

  def __init__(self, kind: str, vocabulary, image_size: int, seq_len: int, tokens_per_image: int,
               max_images: int, task_index: int = 0, subimages=None, chat_template=None,
               split_documents: bool = True, transforms=(), list_features=frozenset()):
    """transforms: the task's record transforms (`mm1_jax.data.transforms`), run first;
    list_features: the record's list-valued features (the others are single values)."""
    from mm1_jax.data import vocabulary as vocab_lib  # noqa: PLC0415  (loads seqio, tensorflow)

    self.kind, self.vocab, self.image_size, self.task_index = kind, vocabulary, image_size, task_index
    self.ids = vocab_lib.special_ids(vocabulary)  # here, not in the threads: computed once
    self.max_len, self.max_images = seq_len + 1, max_images
    self.subimages, self.k = subimages, highres.per_image(subimages)
    self.q = tokens_per_image * self.k  # placeholders per source image
    self.template = chat_template or chat.ChatTemplate()
    self.split = split_documents and kind != "chat"
    self.transforms, self.list_features = tuple(transforms), frozenset(list_features)

  def _transformed(self, f: dict) -> dict | Skipped:
    """The record after the task's record transforms (features as lists again)."""
    record = {k: (v if k in self.list_features else (v[0] if v else b"")) for k, v in f.items()}
    for t in self.transforms:
      record = t.apply(record)
      if record is None:
        return Skipped(f"filtered_{t.name}")
      if isinstance(record, Exception):
        return Skipped(f"transform_error_{t.name}")
    return {k: (list(v) if k in self.list_features else [v]) for k, v in record.items()}

  def _text(self, f: dict) -> tuple[np.ndarray, np.ndarray | None, list[bytes]] | Skipped:
    if self.kind == "chat":
      try:
        turns = chat.parse(f["conversations"][0])
        ids, weights = chat.tokenize(self.vocab, turns, self.template, eos_id=self.ids.eos)
      except (chat.BadConversation, KeyError, IndexError):
        return Skipped("bad_conversation")
      return ids, weights, f.get("images", [])
    try:
      if self.kind == "caption":
        text = "<image>" + f["caption"][0].decode("utf-8", "replace") + "\n"
        encoded = f["image"][:1]
      elif self.kind == "interleaved":
        text, encoded = f["text"][0].decode("utf-8", "replace"), f.get("images", [])
      else:
        text, encoded = f["text"][0].decode("utf-8", "replace"), []
    except (KeyError, IndexError):
      return Skipped("empty_text")
    if not text.replace("<image>", "").strip():
      return Skipped("empty_text")
    return np.asarray(list(self.vocab.encode(text)) + [self.ids.eos], np.int32), None, encoded

  def plan(self, record: bytes):
    """record -> (the `split_document` examples, encoded images) or Skipped; decodes no image."""
    f = _features(record)
    if self.transforms:
      f = self._transformed(f)
      if isinstance(f, Skipped):
        return f
    parsed = self._text(f)
    if isinstance(parsed, Skipped):
      return parsed
    ids, weights, encoded = parsed
    if int((ids == self.ids.image).sum()) != len(encoded):
      return Skipped("image_count_mismatch")
    chunks = split_document(ids, self.max_len, self.q, self.max_images, image_id=self.ids.image,
                            weights=weights, split=self.split)
    chunks = [c for c in chunks if c[2] is None or c[2][1:].any()]  # something to learn
    return chunks if chunks else Skipped("too_short"), encoded

  def tokens(self, record: bytes) -> int | None:
    """The tokens a record feeds the model (`record_tokens`); None if it is skipped."""
    planned = self.plan(record)
    if isinstance(planned, Skipped) or isinstance(planned[0], Skipped):
      return None
    return record_tokens([c[0] for c in planned[0]])

  def __call__(self, record: bytes) -> list[dict] | Skipped:
    planned = self.plan(record)
    if isinstance(planned, Skipped):
      return planned
    chunks, encoded = planned
    if isinstance(chunks, Skipped):
      return chunks
    # Only the images the examples hold are decoded (a dropped remainder's are not).
    needed = range(chunks[0][1][0], chunks[-1][1][1])
    try:
      decoded = {i: decode_image(encoded[i], self.image_size, self.subimages) for i in needed}
    except (OSError, SyntaxError, ValueError):
      return Skipped("corrupt_image")
    shape = (0, self.image_size, self.image_size, 3)
    out = []
    for ids, (first, end), weights in chunks:
      images = [decoded[i] for i in range(first, end)]
      if self.subimages is not None:
        images = [sub for image in images for sub in image]  # K slots per image, in order
      ex = {"text": ids, "images": np.stack(images) if images else np.zeros(shape, np.uint8),
            "task": self.task_index}
      if weights is not None:
        ex["weights"] = weights
      out.append(ex)
    return out


def _pack_iter_dataset(parent, seq_len: int, max_images: int, image_size: int, pack: bool,
                       skipped: collections.Counter, stats: collections.Counter, *, image_id: int,
                       pad_id: int, rows: int = 1, max_age: int | None = None):
  """An IterDataset of packed rows (`pipeline.Packer`: first fit over `rows` open rows) with
  exact, JSON-able state.

  `parent` yields, per record, the list of its examples (several for a long document) or
  Skipped. The state holds no row contents: it is the parent's position before the oldest
  example still in an open row (its document and chunk) and, for every example placed
  since, the slot of the open row it is in (-1: a row already emitted). A restored loader
  reads those examples again and rebuilds the open rows; the packer's age limit bounds
  that replay. With nothing open, the state is the position of the next example, so a
  loader restored in the middle of a long document continues with its next chunk.
  max_age: the packer's (None: its default).
  """
  import grain  # noqa: PLC0415  (grain: only when loading data)

  from mm1_jax.data.pipeline import Packer  # noqa: PLC0415  (pipeline loads tensorflow, seqio)

  closed = -1

  class PackIterator(grain.DatasetIterator):
    def __init__(self, parent_it):
      super().__init__(parent_it)
      self._reset()

    def _reset(self) -> None:
      self._packer = Packer(seq_len, max_images, image_size, image_id=image_id, pad_id=pad_id, rows=rows,
                            pack=pack, max_age=max_age)
      self._doc, self._doc_state, self._next, self._seq = None, None, 0, -1
      self._doc_states: dict[int, Any] = {}  # document number -> parent state before it
      self._log: list[tuple[int, int, int]] = []  # per example placed: (document, chunk, row id)
      self._row_ids: list[int] = [closed] * len(self._packer.rows)  # the row id in each slot
      self._ids = 0
      self._done = False

    def _read(self, count: bool = True) -> None:
      """The next document's examples (raises StopIteration at the end of the data)."""
      while True:
        before = self._parent.get_state()
        ex = next(self._parent)
        if isinstance(ex, Skipped):
          if count:
            skipped[ex.reason] += 1
          continue
        self._seq += 1
        self._doc, self._doc_state, self._next = ex, before, 0
        self._doc_states[self._seq] = before
        if count and len(ex) > 1:
          stats["documents_split"] += 1
          stats["chunks"] += len(ex)
        return

    def _example(self, count: bool = True) -> tuple[int, int, dict]:
      while self._doc is None or self._next >= len(self._doc):
        self._read(count)
      self._next += 1
      return self._seq, self._next - 1, self._doc[self._next - 1]

    def _place(self, seq: int, chunk: int, ex: dict, slot: int | None = None):
      slot, emitted = self._packer.place(ex["text"], ex["images"], ex.get("weights"), slot)
      if self._packer.rows[slot].num_segments == 1:  # a new row
        self._row_ids[slot], self._ids = self._ids, self._ids + 1
      self._log.append((seq, chunk, self._row_ids[slot]))
      if emitted is not None:
        self._trim()
      return emitted

    def _emit(self, slot: int) -> dict[str, np.ndarray]:
      self._row_ids[slot] = closed
      row = self._packer.take(slot)
      self._trim()
      return row

    def _trim(self) -> None:
      """Forgets the examples before the oldest one still in an open row."""
      live = set(self._row_ids) - {closed}
      drop = 0
      while drop < len(self._log) and self._log[drop][2] not in live:
        drop += 1
      del self._log[:drop]
      first = self._log[0][0] if self._log else self._seq
      for seq in [k for k in self._doc_states if k < first]:
        del self._doc_states[seq]

    def __next__(self) -> dict[str, np.ndarray]:
      while not self._done:
        late = self._packer.overdue()
        if late is not None:
          return self._emit(late)
        try:
          seq, chunk, ex = self._example()
        except StopIteration:
          self._done = True
          break
        emitted = self._place(seq, chunk, ex)
        if emitted is not None:
          return emitted
      # The end of the data: the open rows, oldest first.
      open_slots = [i for i, r in enumerate(self._packer.rows) if r is not None]
      if not open_slots:
        raise StopIteration
      return self._emit(min(open_slots, key=lambda i: self._packer.born[i]))

    def get_state(self) -> dict[str, Any]:
      state = {"skipped": dict(skipped), "stats": dict(stats)}
      self._trim()
      if self._log:  # open rows: replay from their oldest example
        slot_of = {rid: i for i, rid in enumerate(self._row_ids) if rid != closed}
        seq, chunk, _ = self._log[0]
        ages = [None if r is None else self._packer.count - self._packer.born[i]
                for i, r in enumerate(self._packer.rows)]
        # "resume": where the parent is now, past any skipped records read after the last
        # example (at the end of the data), which the replay would otherwise count again.
        return {"parent": self._doc_states[seq], "chunk": chunk, "resume": self._parent.get_state(),
                "pack_rows": len(self._packer.rows), "slots": [slot_of.get(rid, closed) for _, _, rid in self._log],
                "ages": ages, **state}
      if self._doc is not None and self._next < len(self._doc):  # inside a document
        return {"parent": self._doc_state, "chunk": self._next, **state}
      return {"parent": self._parent.get_state(), **state}

    def set_state(self, state: dict[str, Any]) -> None:
      if "slots" in state and state.get("pack_rows") != len(self._packer.rows):
        raise ValueError(f"this loader state was saved with pack_rows={state.get('pack_rows')}; it resumes only "
                         f"with the same (DataConfig.pack_rows is {len(self._packer.rows)})")
      self._parent.set_state(state["parent"])
      self._reset()
      skipped.clear()
      skipped.update(state.get("skipped", {}))
      stats.clear()
      stats.update(state.get("stats", {}))
      if state.get("chunk") is None:
        return
      # Read that document again (it and all after it up to here are already counted).
      self._read(count=False)
      self._next = int(state["chunk"])
      for slot in state.get("slots", []):
        seq, chunk, ex = self._example(count=False)
        if slot == closed:
          self._log.append((seq, chunk, closed))
        else:
          self._place(seq, chunk, ex, slot)
      for i, age in enumerate(state.get("ages", [])):
        if age is not None:
          self._packer.born[i] = self._packer.count - int(age)
      if "resume" in state:
        self._parent.set_state(state["resume"])

  class PackIterDataset(grain.IterDataset):
    def __iter__(self):
      return PackIterator(self._parent.__iter__())

  return PackIterDataset(parent)


class Loader:
  """Iterator of host-local numpy batches with `get_state` / `set_state` (JSON-able)."""

  def __init__(self, iterator, skipped: collections.Counter, stats: collections.Counter | None = None,
               mixing: dict | None = None):
    self._it, self._skipped = iterator, skipped
    self._stats = stats if stats is not None else collections.Counter()
    self._mixing = mixing or {}

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

  def stats(self) -> dict[str, int]:
    """Long documents so far (this run and the runs it resumed): "documents_split", the
    records that did not fit one sequence, and "chunks", the examples they became."""
    return {k: int(self._stats.get(k, 0)) for k in STAT_KEYS}

  def mixing(self) -> dict[str, dict]:
    """Per task: its configured rate, the sampling weight used and, with rate_unit
    "tokens", the estimated tokens per record (`mixed_examples`)."""
    return self._mixing


STAT_KEYS = ("documents_split", "chunks")


def estimate_tokens(records, prepare: _Prepare, n: int, seed: int) -> tuple[float, int]:
  """(mean tokens per record, records it is over) from up to n records of a task: the first
  of a seeded permutation of all its records (the same on every host). Each record counts
  the tokens it feeds the model (`record_tokens`: text and tokens_per_image per image, over
  all the examples a long document is split into). A skipped record counts 0: the mixture
  draws it like any other, and it feeds nothing. The count is of usable records."""
  order = np.random.default_rng([seed, 20240]).permutation(len(records))[:n]
  lengths = []
  for start in range(0, len(order), 64):
    batch = [int(i) for i in order[start:start + 64]]
    got = records.__getitems__(batch) if hasattr(records, "__getitems__") else [records[i] for i in batch]
    lengths += [prepare.tokens(r) for r in got]
  usable = sum(t is not None and t > 0 for t in lengths)
  return (float(np.mean([t or 0 for t in lengths])) if usable else float("nan")), usable


def mixed_examples(config, *, tokens_per_image: int, image_size: int, shard_index: int = 0,
                   num_shards: int = 1, num_epochs: int | None = None):
  """(grain MapDataset of prepared records, mixed by rate; the task names; the mixing report).

  Each element is Skipped or the list of a record's examples (see `_Prepare`); each
  example carries "task", the index of its task in the returned names. The mixing report
  (`Loader.mixing`) names, per task, the configured rate, the sampling weight and, with
  `DataConfig.rate_unit = "tokens"`, the estimated tokens per record that the rate was
  divided by, so that the tasks' shares of tokens (not of records) follow the rates.
  """
  import grain  # noqa: PLC0415  (grain: only when loading data)

  from mm1_jax.data import pipeline, sources  # noqa: PLC0415  (they load tensorflow, seqio)

  mixture = pipeline.get_mixture_or_task(config)
  tasks = [(t, mixture.get_rate(t)) for t in mixture.tasks] if hasattr(mixture, "tasks") else [(mixture, 1.0)]
  datasets, weights, names, report = [], [], [], {}
  by_tokens = config.rate_unit == "tokens" and len(tasks) > 1
  for i, (task, rate) in enumerate(tasks):
    if rate <= 0:
      continue
    src = task.source
    if not isinstance(src, sources.RandomAccessRecords) or src.kind is None:
      raise ValueError(f"task {task.name!r} has a {type(src).__name__}; the grain loader reads the corpora "
                       "`mm1-data build` writes (sources.corpus_source). Set DataConfig.loader='tfdata'.")
    transforms = sources.grain_transforms(task)  # a preprocessor it cannot run stops here
    records = src.random_access(config.split)
    lists = {k for k, v in src.features.items() if not hasattr(v, "shape")}  # VarLenFeatures
    prepare = _Prepare(src.kind, task.output_features["text"].vocabulary, image_size, config.seq_len,
                       tokens_per_image, config.max_images, task_index=len(names),
                       subimages=config.subimages, chat_template=config.chat_template,
                       split_documents=config.split_documents, transforms=transforms, list_features=lists)
    entry = {"kind": src.kind, "rate": float(rate)}
    weight = float(rate)
    if by_tokens:
      mean, counted = estimate_tokens(records, prepare, config.rate_sample, config.seed)
      if not counted:
        raise ValueError(f"rate_unit='tokens': none of the first {config.rate_sample} records of task "
                         f"{task.name!r} is usable, so its tokens per record cannot be estimated")
      weight = rate / mean
      entry.update(mean_tokens_per_record=mean, records_sampled=counted)
    ds = grain.MapDataset.source(records)[shard_index::num_shards]
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed * 1000 + i)
    ds = ds.repeat(num_epochs)  # reshuffled every epoch
    datasets.append(ds.map(prepare))
    weights.append(weight)
    names.append(task.name)
    report[task.name] = {**entry, "weight": weight}
  if not datasets:
    raise ValueError(f"{config.mixture_or_task_name!r}: every task has rate 0")
  total_rate, total_weight = sum(r["rate"] for r in report.values()), sum(weights)
  for r in report.values():
    r["rate"] /= total_rate
    r["weight"] /= total_weight  # the share of records drawn from the task
  if by_tokens:
    for name, r in report.items():
      print(f"data: rate_unit=tokens: {name}: {r['mean_tokens_per_record']:.1f} tokens per record "
            f"(over {r['records_sampled']} records), token rate {r['rate']:.3f} -> record rate "
            f"{r['weight']:.3f}", flush=True)
  return (grain.MapDataset.mix(datasets, weights) if len(datasets) > 1 else datasets[0]), names, report


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
  from mm1_jax.data import pipeline  # noqa: PLC0415  (pipeline loads tensorflow, seqio)

  if config.batch_size % num_shards:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_shards} hosts")
  import grain  # noqa: PLC0415  (grain: only when loading data)

  mixed, _, mixing = mixed_examples(config, tokens_per_image=tokens_per_image, image_size=image_size,
                                    shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs)
  ids = pipeline.special_ids_of(pipeline.get_mixture_or_task(config))
  read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=4 * config.batch_size)
  skipped: collections.Counter = collections.Counter()
  stats: collections.Counter = collections.Counter()
  packed = _pack_iter_dataset(mixed.to_iter_dataset(read), config.seq_len, config.image_slots, image_size,
                              config.pack, skipped, stats, image_id=ids.image, pad_id=ids.pad,
                              rows=config.pack_rows)
  batched = packed.batch(config.batch_size // num_shards, drop_remainder=True)
  return Loader(iter(batched), skipped, stats, mixing)
