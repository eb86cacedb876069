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
import pathlib
import shutil
import tempfile
import uuid
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # etils is imported on first use: the goodput ledger and tpu_scripts import this
  from etils import epath

PathLike = Union[str, os.PathLike, "epath.Path"]


def is_remote(p: PathLike) -> bool:
  """Whether `p` names a bucket (or other non-local) location: it has a URL scheme."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: a bucket path as given, a local one absolute with `~` expanded."""
  text = os.fspath(p)
  try:
    from etils import epath  # noqa: PLC0415  (see the import above)
  except ImportError:  # a bare launcher's Python (tpu_scripts): local paths still work
    if is_remote(text):
      raise ImportError(f"{text}: bucket paths need etils[epath] and gcsfs (pip install mm1_jax)") from None
    return pathlib.Path(os.path.abspath(os.path.expanduser(text)))
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


def upload(source: PathLike, target: PathLike) -> None:
  """Copies the local file `source` to `target` (local or in a bucket) in one object write."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(source, "rb") as src, target.open("wb") as dst:
    shutil.copyfileobj(src, dst)


def download(source: PathLike, target: PathLike) -> None:
  """Copies the file `source` (local or in a bucket) to the local file `target`."""
  with path(source).open("rb") as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst)


def local_file(p: PathLike, suffix: str = "") -> str:
  """A local file with the content of `p`: `p` itself when local, else a temporary copy."""
  if not is_remote(p):
    return os.fspath(path(p))
  fd, tmp = tempfile.mkstemp(prefix="mm1_", suffix=suffix)
  os.close(fd)
  download(p, tmp)
  return tmp


class Mirror:
  """A local folder standing in for `remote` (a bucket folder) for files written bit by bit
  (appended lines, TensorBoard event files), which Cloud Storage cannot take: `sync()`
  uploads each file that changed since the last sync whole, one request per object, so a
  reader sees an old copy or a new one. `fetch` names files (relative to `remote`) to
  download first, to be appended to."""

  def __init__(self, remote: PathLike, fetch: tuple[str, ...] = ()):
    self.remote = path(remote)
    self.local = pathlib.Path(tempfile.mkdtemp(prefix="mm1_mirror_"))
    self._uploaded: dict[str, tuple[int, int]] = {}  # file -> (size, mtime_ns) last uploaded
    for name in fetch:
      if (self.remote / name).exists():
        (self.local / name).parent.mkdir(parents=True, exist_ok=True)
        download(self.remote / name, self.local / name)

  def sync(self) -> list[str]:
    """Uploads what changed; returns the files that could not be (tried again next time)."""
    failed = []
    for root, _, names in os.walk(self.local):
      for name in names:
        local = pathlib.Path(root) / name
        stat = local.stat()
        key = local.relative_to(self.local).as_posix()
        if self._uploaded.get(key) == (stat.st_size, stat.st_mtime_ns):
          continue
        try:
          upload(local, self.remote / key)
        except Exception as e:  # noqa: BLE001  (gcsfs and TF's gfile raise their own errors, not OSError)
          failed.append(f"{key} ({type(e).__name__}: {e})")
          continue
        self._uploaded[key] = (stat.st_size, stat.st_mtime_ns)
    return failed

  def close(self) -> list[str]:
    """A last sync; the local folder is removed only when everything reached the bucket
    (otherwise it is kept, and the failures name it, so nothing is lost)."""
    failed = self.sync()
    if failed:
      return [*failed, f"the local copy stays in {self.local}"]
    shutil.rmtree(self.local, ignore_errors=True)
    return failed
