"""The `mm1-data build` pipeline on Apache Beam.

  read units -> Reshuffle -> read, check, hash (ReadAndCheck) -> GroupByKey(shard) -> dedup, write (WriteShard)

Sources are cut into units (`formats.units`: a file, or a part of a large JSONL,
Parquet or JSON file) that workers read in parallel. Each usable record is checked
(`formats.check`, which also drops held-out evaluation images by SHA-256), serialised,
and keyed by a content digest (kind, text and image bytes). The digest picks the
record's shard, so exact duplicates meet in one shard, where the writer keeps one copy
(the smallest id) and writes the shard sorted by digest: the output is the same files
whichever runner and however many workers built it.

Counts (records skipped and images dropped by reason, duplicates, images written, the
MM1 length counts) are Beam metrics in the namespace `mm1_data`, so they add up over
workers on any runner; `build` reads them back into the JSON report.

The runner is Beam's: the DirectRunner in this process (`num_workers=1`), in worker
processes (`num_workers>1`), or any other given through Beam's own options
(`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`); see
docs/data.md. Each shard is held in one worker's memory while it is written: choose
`num_shards` so that a shard is a few hundred MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics

from mm1_jax import paths
from mm1_jax.data import documents, formats
from mm1_jax.data.corpus import tf_example

NAMESPACE = "mm1_data"
log = logging.getLogger(__name__)
STAGED = "shard-{:05d}-n{}.array_record"  # a written shard in the staging folder: its index and record count
SPILLED = "unit-{:07d}.array_record"  # the records one unit's reader left (`Spec.spill`)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What every worker needs (pickled to them)."""

  kind: str
  checks: formats.Checks
  held_out: frozenset[str]
  num_shards: int
  staging: str  # a folder (local or a bucket) the writers put shards in
  tokenizer: str | None = None  # for the MM1 length counts in tokens
  progress: bool = False
  # A local folder where readers leave the serialised records (one file per unit), so
  # that only keys travel through the shuffle; None: records travel in it.
  spill: str | None = None


def features(ex: formats.Example) -> dict:
  """An example's stored fields (`mm1_jax.data.tfds_layout.features`)."""
  if ex.kind == "caption":
    return {"id": ex.id, "image": ex.images[0], "caption": ex.text}
  if ex.kind == "interleaved":
    return {"id": ex.id, "images": ex.images, "text": ex.text}
  if ex.kind == "chat":
    return {"id": ex.id, "images": ex.images, "conversations": ex.text}
  return {"id": ex.id, "text": ex.text}


def content_digest(ex: formats.Example) -> str:
  """Identifies a record by content: equal kind, text and image bytes give equal digests."""
  h = hashlib.sha256(ex.kind.encode())
  for part in (ex.text.encode("utf-8"), *ex.images):
    h.update(len(part).to_bytes(8, "little"))
    h.update(part)
  return h.hexdigest()


def _count(name: str, n: int = 1) -> None:
  Metrics.counter(NAMESPACE, name).inc(n)


# One MM1 pre-training sequence (`pipeline.DataConfig` defaults; Q of the C-Abstractor).
MM1_SEQ_LEN, MM1_MAX_IMAGES, MM1_TOKENS_PER_IMAGE = 4096, 16, 144


class _Mm1Lengths:
  """Whether an interleaved document exceeds one MM1 sequence (by images; in tokens too
  with a vocabulary), and how many examples the loaders split it into."""

  def __init__(self, tokenizer: str | None):
    self.vocab = None
    if tokenizer:
      from mm1_jax.data import vocabulary  # noqa: PLC0415  (loads seqio, tensorflow)

      self.vocab = vocabulary.load(tokenizer)
      ids = vocabulary.special_ids(self.vocab)
      self.image_id, self.eos_id = ids.image, ids.eos

  def measure(self, rec: formats.Example) -> tuple[int, int, int]:
    """(over 16 images, over one sequence, examples at MM1 shapes); zeros for other kinds."""
    if rec.kind != "interleaved":
      return 0, 0, 0
    over_images = int(len(rec.images) > MM1_MAX_IMAGES)
    if self.vocab is None:
      return over_images, 0, 0
    ids = np.asarray(list(self.vocab.encode(rec.text)) + [self.eos_id], np.int32)
    is_image = ids == self.image_id
    expanded = len(ids) + (MM1_TOKENS_PER_IMAGE - 1) * int(is_image.sum())
    over = int(expanded > MM1_SEQ_LEN + 1 or over_images)
    examples = len(documents.chunk_bounds(is_image, MM1_SEQ_LEN + 1, MM1_TOKENS_PER_IMAGE, MM1_MAX_IMAGES))
    return over_images, over, examples


class ReadAndCheck(beam.DoFn):
  """(index, unit) -> (shard, (digest, id, record, images, length counts)) per usable
  record, where record is the serialised example, or with `Spec.spill` its place
  (unit index, position) in the unit's spill file."""

  def __init__(self, spec: Spec):
    self.spec = spec

  def setup(self):
    self._lengths = _Mm1Lengths(self.spec.tokenizer)
    self._bar = None
    if self.spec.progress:
      from tqdm import tqdm  # noqa: PLC0415

      self._bar = tqdm(desc=f"build {self.spec.kind} (pid {os.getpid()})", unit="rec")

  def process(self, element: tuple[int, formats.Unit]) -> Iterator[tuple[int, tuple]]:
    index, unit = element
    spill = _SpillWriter(self.spec.spill, index) if self.spec.spill else None
    try:
      yield from self._records(unit, index, spill)
    finally:
      if spill is not None:
        spill.close()

  def _records(self, unit: formats.Unit, index: int, spill) -> Iterator[tuple[int, tuple]]:
    spec = self.spec
    records = formats.read_unit(unit)
    while True:
      # The readers turn every bad input they know into a Skip; anything else one raises
      # ends its unit (the records before it are kept), counted, rather than the build.
      try:
        rec = next(records)
      except StopIteration:
        break
      except Exception as e:  # noqa: BLE001
        _count("skipped/unreadable_part")
        log.warning("%s (part %s): reading stopped at %s: %s", unit.path, unit.part, type(e).__name__, e)
        break
      if self._bar is not None:
        self._bar.update()
      if isinstance(rec, formats.Skip):
        _count(("images_dropped/" if rec.image_only else "skipped/") + rec.reason)
        continue
      try:
        rec, lost, cut = formats.check(rec, spec.checks, spec.held_out)
      except Exception as e:  # noqa: BLE001  (a record no check foresaw: counted, not fatal)
        _count("skipped/bad_record")
        log.warning("%s: %s: %s", rec.id, type(e).__name__, e)
        continue
      for s in lost:
        _count("images_dropped/" + s.reason)
      if cut:
        _count("truncated_documents")
      if isinstance(rec, formats.Skip):
        _count("skipped/" + rec.reason)
        continue
      digest = content_digest(rec)
      shard = int(digest[:16], 16) % spec.num_shards
      data = tf_example(features(rec))
      yield shard, (digest, rec.id, spill.write(data) if spill else data, len(rec.images),
                    self._lengths.measure(rec))

  def teardown(self):
    if getattr(self, "_bar", None) is not None:
      self._bar.close()


class _SpillWriter:
  """The serialised records of one unit, in a local ArrayRecord file the shard writers
  read back by position: written under a temporary name and renamed when complete."""

  def __init__(self, folder: str, index: int):
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    self.index, self.count = index, 0
    self.path = Path(folder) / SPILLED.format(index)
    self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
    self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")

  def write(self, data: bytes) -> tuple[int, int]:
    self._writer.write(data)
    self.count += 1
    return self.index, self.count - 1

  def close(self) -> None:
    self._writer.close()
    os.replace(self._tmp, self.path)


def _unspill(folder: str, refs: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
  """The records at (unit index, position) in the spill files."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: PLC0415

  by_unit: dict[int, list[int]] = {}
  for unit, pos in refs:
    by_unit.setdefault(unit, []).append(pos)
  out = {}
  for unit, positions in by_unit.items():
    positions.sort()
    records = ArrayRecordDataSource([str(Path(folder) / SPILLED.format(unit))])
    out.update(zip(((unit, p) for p in positions), records.__getitems__(positions)))
  return out


class WriteShard(beam.DoFn):
  """(shard, records) -> one ArrayRecord file in the staging folder, duplicates removed,
  sorted by digest; yields (shard, records written)."""

  def __init__(self, spec: Spec):
    self.spec = spec

  def process(self, element: tuple[int, Iterable[tuple]]) -> Iterator[tuple[int, int]]:
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    shard, records = element
    records = sorted(records, key=lambda r: (r[0], r[1]))  # by digest, then id: the smallest id is kept
    kept = [r for i, r in enumerate(records) if i == 0 or r[0] != records[i - 1][0]]
    _count("skipped/duplicate", len(records) - len(kept))
    if self.spec.spill:  # the records are (unit, position) references into the spill files
      spilled = _unspill(self.spec.spill, [r[2] for r in kept])
      kept = [(r[0], r[1], spilled[r[2]], *r[3:]) for r in kept]
    staging = paths.path(self.spec.staging)
    remote = paths.is_remote(staging)
    # Written under a temporary name, then named with its count: a shard a failed worker
    # left half-written is never taken for a finished one (a retry rewrites it whole).
    local = Path(tempfile.mkdtemp(prefix="mm1-shard-") if remote else staging) / f".shard-{shard:05d}.tmp{os.getpid()}"
    local.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(local), "group_size:1")  # every record addressable (random access)
    try:
      for r in kept:
        writer.write(r[2])
    finally:
      writer.close()
    written = len(kept)
    _count("images_written", sum(r[3] for r in kept))
    for i, name in enumerate(("interleaved_over_16_images", "interleaved_over_4096_tokens_or_16_images",
                              "interleaved_examples_at_mm1_shapes")):
      _count(name, sum(r[4][i] for r in kept))
    target = staging / STAGED.format(shard, written)
    if remote:
      paths.upload(local, target)
      local.unlink()
      local.parent.rmdir()
    else:
      os.replace(local, target)
    yield shard, written


def unknown_options(args: list[str]) -> list[str]:
  """The flags in `args` that no Beam pipeline option takes (Beam itself only logs and
  drops them, so a misspelt flag would be ignored)."""
  from apache_beam.options import pipeline_options as po  # noqa: PLC0415

  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, conflict_handler="resolve")
  for cls in po.PipelineOptions.__subclasses__():
    cls._add_argparse_args(parser)  # noqa: SLF001  (how Beam builds its own parser)
  return parser.parse_known_args(args)[1]


def pipeline_options(num_workers: int, beam_args: list[str] | None = None):
  """Beam options: the DirectRunner with `num_workers` (1: in this process; more: worker
  processes), unless beam_args name another runner."""
  from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

  args = list(beam_args or ())
  if not any(a.startswith("--runner") for a in args):
    mode = "in_memory" if num_workers <= 1 else "multi_processing"
    args += ["--runner=DirectRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={max(num_workers, 1)}"]
  if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
    args.append("--default_sdk_harness_log_level=WARNING")  # workers' INFO lines would bury the progress bars
  return PipelineOptions(args)


def run(units: list[formats.Unit], spec: Spec, options) -> dict[str, int]:
  """Runs the pipeline over `units`; returns the counters (name -> total)."""
  from apache_beam.metrics.metric import MetricsFilter  # noqa: PLC0415

  p = beam.Pipeline(options=options)
  _ = (p
       | "units" >> beam.Create(list(enumerate(units)))
       | "spread" >> beam.Reshuffle()
       | "read and check" >> beam.ParDo(ReadAndCheck(spec))
       | "by shard" >> beam.GroupByKey()
       | "write" >> beam.ParDo(WriteShard(spec)))
  result = p.run()
  result.wait_until_finish()
  counters: dict[str, int] = {}
  for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value or 0)
  return counters
