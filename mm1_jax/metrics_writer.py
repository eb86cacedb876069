"""Training metrics to stdout, <workdir>/metrics.jsonl and TensorBoard event files.

Every metric goes to metrics.jsonl and TensorBoard; the printed line leaves out those
whose name starts with one of QUIET_PREFIXES (the badput_* split of goodput: see
mm1_jax/goodput.py), which would crowd it.

A workdir in a bucket (gs://...): Cloud Storage objects cannot be appended to, so both
files are written to a local folder and uploaded whole by `sync()`: at most every
`sync_every_s` seconds as metrics arrive, whenever the training loop asks (after each
checkpoint save, so the bucket's metrics reach the newest checkpoint), and at close. A
resumed run first downloads the bucket's metrics.jsonl and appends to it. A process that
dies without closing loses the lines logged since its last sync; a resumed run logs
those steps again from its checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

from mm1_jax import paths, tb_events

QUIET_PREFIXES = ("badput_",)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  def __init__(self, workdir: paths.PathLike, *, tensorboard: bool = True, echo=print,
               sync_every_s: float = 60.0, files: bool = True):
    """files=False: print only (the processes of a multi-host run other than the first,
    whose metrics would overwrite the same objects)."""
    self._mirror = paths.Mirror(workdir, fetch=(METRICS_FILE,)) if files and paths.is_remote(workdir) else None
    local = self._mirror.local if self._mirror else Path(paths.path(workdir))
    self.path = local / METRICS_FILE if files else None
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    self.sync_every_s = sync_every_s
    self._synced = time.monotonic()
    self._echo = echo
    self._tb = None
    if tensorboard and files:
      self._tb = tb_events.ScalarWriter(local / TENSORBOARD_DIR)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: float(v) for k, v in metrics.items()})
    if self.path is not None:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.add_scalars(step, metrics)
    if self._echo:
      shown = {k: v for k, v in metrics.items() if not k.startswith(QUIET_PREFIXES)}
      self._echo(f"step {step:>6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    if self._mirror and time.monotonic() - self._synced >= self.sync_every_s:
      self.sync()

  def sync(self) -> None:
    """A bucket workdir: uploads what changed since the last sync. A failed upload is
    reported and tried again at the next sync; it never stops the run."""
    if self._mirror is None:
      return
    self._synced = time.monotonic()
    self._report(self._mirror.sync())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._mirror is not None:
      self._report(self._mirror.close())

  def _report(self, failed: list[str]) -> None:
    if failed:
      print(f"warning: could not upload to {self._mirror.remote}: {'; '.join(failed)}", flush=True)


def _fmt(v: float) -> str:
  v = float(v)
  if v == 0 or 1e-3 <= abs(v) < 1e5:
    return f"{v:.4g}"
  return f"{v:.3e}"
