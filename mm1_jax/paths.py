"""Paths that may be local or in a bucket: `gs://bucket/...` (and any scheme etils.epath
knows) work wherever a run reads or writes a folder: checkpoints, imported parts,
`init_from`, eval results and reports.

`path` gives an `etils.epath.Path` (the pathlib API over local files, TensorFlow's gfile
or fsspec/gcsfs for buckets; orbax uses the same). Local paths are made absolute with `~`
expanded, so a run's config names the folder it used. Cloud Storage has no rename, so
`write_text_atomic` writes a bucket object in one request (an object appears whole or
not at all) and renames a local temporary file.

A Cloud Storage emulator on 127.0.0.1 serves in tests: with TensorFlow installed, epath
reaches buckets through TF's gfile, which ignores emulators; `EPATH_USE_TF=false` (set by
the tests) selects fsspec/gcsfs, which reads `STORAGE_EMULATOR_HOST`, and tensorstore
(orbax's array writer) reads `TENSORSTORE_GCS_HTTP_URL`.
"""

from __future__ import annotations

import os
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(p: PathLike) -> bool:
  """Whether `p` names a bucket (or other non-local) location: it has a URL scheme."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: a bucket path as given, a local one absolute with `~` expanded."""
  text = os.fspath(p)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text_atomic(target: PathLike, text: str) -> None:
  """Writes `text` so that readers see the old content or the new, never a part."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_text(text)  # one object upload: atomic on Cloud Storage
    return
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_text(text)
  tmp.replace(target)
