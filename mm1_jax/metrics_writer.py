"""Training metrics to stdout, <workdir>/metrics.jsonl and TensorBoard event files.

Every metric goes to metrics.jsonl and TensorBoard; the printed line leaves out those
whose name starts with one of QUIET_PREFIXES (the badput_* split of goodput: see
mm1_jax/goodput.py), which would crowd it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

QUIET_PREFIXES = ("badput_",)


class MetricWriter:
  def __init__(self, workdir: str | Path, *, tensorboard: bool = True, echo=print):
    self.path = Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._echo = echo
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # no tensorflow needed
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: float(v) for k, v in metrics.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()
    if self._echo:
      shown = {k: v for k, v in metrics.items() if not k.startswith(QUIET_PREFIXES)}
      self._echo(f"step {step:>6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _fmt(v: float) -> str:
  v = float(v)
  if v == 0 or 1e-3 <= abs(v) < 1e5:
    return f"{v:.4g}"
  return f"{v:.3e}"
