"""Held-out check: which eval images also appear in the training mixture.

Images are compared by content hash: the SHA-256 of the encoded file bytes. `mm1-data
build` keeps JPEG and PNG images byte for byte, so an eval image that went into the
training corpus has the same hash there; a copy that was re-encoded, resized or cropped
is not found (that would need a perceptual hash).

Hashing a corpus reads every image once; the digests of each ArrayRecord shard are
cached (keyed by the shard's path, size and modification time) in
~/.cache/mm1_jax/image_digests/ (or $MM1_DIGEST_CACHE), so later checks are quick.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm import tqdm

from mm1_jax.data.loader import _features

IMAGE_FEATURES = ("image", "images")


def digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def record_digest(rec: dict) -> str | None:
  """Digest of an eval record's image ("image" bytes or "image_path"); None if unreadable."""
  try:
    data = rec["image"] if "image" in rec else Path(rec["image_path"]).read_bytes()
  except OSError:
    return None
  return digest(bytes(data))


def _cache_dir() -> Path:
  return Path(os.environ.get("MM1_DIGEST_CACHE", "~/.cache/mm1_jax/image_digests")).expanduser()


def _shard_digests(path: str) -> list[str]:
  """Digests of every image in one ArrayRecord shard of tf.train.Examples (cached)."""
  from array_record.python.array_record_data_source import (  # noqa: PLC0415  (array_record: only to hash shards)
      ArrayRecordDataSource)

  st = os.stat(path)
  key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
  cached = _cache_dir() / f"{key}.json"
  if cached.exists():
    try:
      return json.loads(cached.read_text())
    except ValueError:
      pass  # a torn cache file is recomputed
  records = ArrayRecordDataSource([path])
  out = []
  for start in range(0, len(records), 256):
    for raw in records.__getitems__(list(range(start, min(start + 256, len(records))))):
      feats = _features(raw)
      for name in IMAGE_FEATURES:
        out.extend(digest(b) for b in feats.get(name, []) if b)
  cached.parent.mkdir(parents=True, exist_ok=True)
  tmp = cached.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(out))
  tmp.replace(cached)
  return out


def train_image_digests(mixture_or_task: str, split: str = "train", progress: bool = True) -> set[str]:
  """Digests of every image in a registered seqio mixture's (or task's) training split.

  ArrayRecord sources (this package's corpora) are read shard by shard with a cache;
  any other source is read through its tf.data dataset, looking at the "image" and
  "images" features."""
  import seqio  # noqa: PLC0415  (seqio: only when reading a training mixture)

  from mm1_jax.data.sources import RandomAccessRecords  # noqa: PLC0415  (sources loads tensorflow, seqio)

  target = seqio.get_mixture_or_task(mixture_or_task)
  tasks = target.tasks if isinstance(target, seqio.Mixture) else [target]
  found: set[str] = set()
  for task in tasks:
    source = task.source
    if split not in source.splits:
      continue
    if isinstance(source, RandomAccessRecords):
      for shard in tqdm(source.list_shards(split), desc=f"hashing {task.name}", unit="shard",
                        disable=not progress, leave=False):
        found.update(_shard_digests(shard))
      continue
    ds = source.get_dataset(split=split, shuffle=False)
    for ex in tqdm(ds.as_numpy_iterator(), desc=f"hashing {task.name}", unit="example",
                   disable=not progress, leave=False):
      for name in IMAGE_FEATURES:
        value = ex.get(name)
        if value is None:
          continue
        values = [value] if isinstance(value, bytes) else list(getattr(value, "values", value))
        found.update(digest(bytes(v)) for v in values if v)
  return found
