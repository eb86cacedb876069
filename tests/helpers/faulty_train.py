"""mm1-train with one injected fault, for the reliability tests.

  python faulty_train.py FAULT [mm1-train flags]

FAULT:
  nan_steps=3,6-100        the batches of those (1-based) steps get a NaN loss weight
  kill_before_commit=4     SIGKILL the process once checkpoint 4 is written but not yet
                           committed (its temporary folder not yet renamed)
  stall_step=6             step 6 never finishes: its batch takes an hour to arrive, as a
                           step waiting on a dead host would (the hang watchdog's case)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _steps(spec: str) -> set[int]:
  out = set()
  for part in spec.split(","):
    lo, _, hi = part.partition("-")
    out.update(range(int(lo), int(hi or lo) + 1))
  return out


def _inject_nan(steps: set[int]) -> None:
  import numpy as np

  from mm1_jax import train

  real, calls = train.global_batch, [0]

  def global_batch(local, shardings):
    calls[0] += 1
    if calls[0] in steps:
      local = dict(local, loss_weights=np.full_like(local["loss_weights"], np.nan))
    return real(local, shardings)

  train.global_batch = global_batch


def _stall(step: int) -> None:
  import time

  from mm1_jax import train

  real, calls = train.global_batch, [0]

  def global_batch(local, shardings):
    calls[0] += 1
    if calls[0] == step:
      print(f"stalling step {step}", flush=True)
      time.sleep(3600)
    return real(local, shardings)

  train.global_batch = global_batch


def _kill_before_commit(step: int) -> None:
  from orbax.checkpoint._src.path import atomicity

  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if Path(str(self._final_path)).name == str(step):
      print(f"killing the process before checkpoint {step} is committed", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> int:
  fault, argv = sys.argv[1], sys.argv[2:]
  kind, _, value = fault.partition("=")
  from mm1_jax import console

  console.prepare_platform("train")  # before the fault hooks import jax
  if kind == "nan_steps":
    _inject_nan(_steps(value))
  elif kind == "kill_before_commit":
    _kill_before_commit(int(value))
  elif kind == "stall_step":
    _stall(int(value))
  else:
    raise SystemExit(f"unknown fault {fault!r}")
  from mm1_jax import cli

  return cli.main_train(argv)


if __name__ == "__main__":
  sys.exit(main())
