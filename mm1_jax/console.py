"""Console entry points: choose the JAX platform, then hand over to the command.

Every `mm1-*` script (and `python -m mm1_jax COMMAND`) starts here. This module imports
only the standard library, so the platform is settled before JAX loads:

- a host without accelerator device files can only compute on its CPU; saying so
  (JAX_PLATFORMS=cpu) keeps an installed libtpu from probing for chips and printing
  errors at start-up;
- `mm1-aot` only compiles for a TPU topology: it runs on the CPU and may share libtpu
  with other compiles (libtpu's one-process lock guards a TPU runtime it does not use).

A command module may also be run as `python -m mm1_jax.aot`; its `__main__` block calls
`run`, which then sets the platform through `jax.config` (JAX reads it when the first
backend starts, not at import).
"""

from __future__ import annotations

import glob
import importlib
import os
import sys

# command -> (module, function taking argv and returning an exit code)
COMMANDS = {
    "train": ("mm1_jax.cli", "main_train"),
    "eval": ("mm1_jax.cli", "main_eval"),
    "aot": ("mm1_jax.aot", "main"),
    "probe": ("mm1_jax.probe", "main"),
    "supervised": ("mm1_jax.supervised", "main"),
    "params": ("mm1_jax.params", "main"),
    "convert": ("mm1_jax.hf.cli", "main"),
    "data": ("mm1_jax.data.build", "main"),
    "layout": ("mm1_jax.layout", "main"),
    "sweep": ("mm1_jax.sweep", "main"),
}
_COMPILE_ONLY = ("aot",)


def has_accelerator() -> bool:
  """Whether this host has TPU, vfio (TPU v5+) or NVIDIA device files."""
  return any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))


def prepare_platform(command: str) -> None:
  """Sets the JAX platform for `command` unless the user chose one (JAX_PLATFORMS)."""
  if command in _COMPILE_ONLY:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    platform = "cpu"
  else:
    platform = None if has_accelerator() else "cpu"
  if platform is None or "JAX_PLATFORMS" in os.environ:
    return
  os.environ["JAX_PLATFORMS"] = platform
  if "jax" in sys.modules:  # `python -m mm1_jax.<command>`: jax is loaded, no backend yet
    sys.modules["jax"].config.update("jax_platforms", platform)


def run(command: str, argv: list[str] | None = None) -> int:
  prepare_platform(command)
  module, function = COMMANDS[command]
  return getattr(importlib.import_module(module), function)(argv)


def _entry(command: str):
  def main() -> None:
    sys.exit(run(command))
  main.__name__ = command
  main.__doc__ = f"The `mm1-{command}` console script."
  return main


train = _entry("train")
eval = _entry("eval")  # noqa: A001  (the console script's name)
aot = _entry("aot")
probe = _entry("probe")
supervised = _entry("supervised")
params = _entry("params")
convert = _entry("convert")
data = _entry("data")
sweep = _entry("sweep")


def main(argv: list[str] | None = None) -> int:
  """`python -m mm1_jax COMMAND [flags]`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS:
    print(f"usage: python -m mm1_jax {{{','.join(COMMANDS)}}} [flags]  (each takes --help)", file=sys.stderr)
    return 2
  return run(argv[0], argv[1:])
