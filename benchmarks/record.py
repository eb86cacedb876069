"""The record every measurement writes: one JSON per run under benchmarks/results/.

    {"schema": 1, "benchmark": "...", "commit": "<sha>", "dirty": false, "date": "...",
     "command": "...", "machine": {...}, "packages": {...}, "figures": {...}, ...}

`machine` names the CPU (model, vendor, the vector ISA flags, cores this process may use,
memory), the CPU peak derived from that ISA (`mm1_jax.hardware`), and the accelerator where
one is present. `packages` holds the installed versions (read from package metadata, so
nothing heavy is imported). Only the standard library and mm1_jax.hardware (which loads
jax) are needed: a GPU machine without TensorFlow writes records too.

A figure quoted in README.md, benchmarks/README.md or docs/*.md names its record; `check_figures`
(tests/test_records.py) fails when it does not, or when the record does not hold it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from mm1_jax import hardware, sweep

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = 1
PACKAGES = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
            "gin-config", "tensorflow", "seqio", "grain", "torch", "transformers")
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vp2intersect", "amx_bf16",
             "asimd", "sve")


def git_state(repo: Path = REPO) -> tuple[str | None, bool | None]:
  """(commit, whether the tracked tree differs from it); (None, None) outside a checkout."""
  return sweep.git_state(repo)


def packages() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _accelerator() -> str | None:
  """The accelerator jax runs on, if jax is already loaded; else what nvidia-smi reports."""
  jax = sys.modules.get("jax")
  if jax is not None:
    try:
      devices = jax.devices()
      if devices and devices[0].platform != "cpu":
        return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    except RuntimeError:
      pass
    return None
  try:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=20)
    names = [n.strip() for n in proc.stdout.splitlines() if n.strip()]
    return f"{len(names)} x {names[0]} (gpu)" if proc.returncode == 0 and names else None
  except (OSError, subprocess.TimeoutExpired):
    return None


def machine() -> dict:
  info = hardware._cpuinfo()
  flags = set(info.get("flags", info.get("Features", "")).split())
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  mem = None
  try:
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError):
    pass
  out = {"cpu": info.get("model name", platform.processor() or platform.machine()),
         "vendor": info.get("vendor_id"), "arch": platform.machine(),
         "isa": sorted(f for f in ISA_FLAGS if f in flags), "cores": cores, "memory_gib": mem,
         "accelerator": _accelerator()}
  try:
    peak = hardware.cpu_peak(cores)
    out.update(cpu_peak_flops_per_s=peak.flops_per_s, cpu_peak_derivation=peak.derivation)
  except RuntimeError as e:
    out["cpu_peak_derivation"] = str(e)
  return out


def _command() -> str:
  """This process's command line, as typed (`python -m NAME ...` for a module run)."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
  return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def make(benchmark: str, figures: dict, *, command: str | None = None, git: tuple | None = None,
         **extra) -> dict:
  """git: (commit, dirty) taken when the measured code was loaded (default: now)."""
  commit, dirty = git or git_state()
  return {"schema": SCHEMA, "benchmark": benchmark, "commit": commit, "dirty": dirty,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "command": command or _command(),
          "machine": machine(), "packages": packages(), **extra, "figures": figures}


def write(path: str | Path, benchmark: str, figures: dict, **kwargs) -> dict:
  """Writes the record of one run to `path` (a name under benchmarks/results/ if relative)."""
  path = Path(path)
  if not path.is_absolute():
    path = RESULTS / path
  rec = make(benchmark, figures, **kwargs)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rec, indent=1, sort_keys=False, default=float) + "\n")
  return rec


def load(path: str | Path) -> dict:
  path = Path(path)
  return json.loads((path if path.is_absolute() else RESULTS / path).read_text())


def all_records(root: Path = RESULTS) -> dict[str, dict]:
  """{path relative to root: record} for every JSON under root (results/)."""
  return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}


def short_commit(rec: dict) -> str:
  c = rec.get("commit")
  return "unknown" if not c else c[:10] + ("+dirty" if rec.get("dirty") else "")
