"""Peak FLOP/s of the device a step runs on: the denominator of MFU.

One definition everywhere (training logs, benchmarks, the TPU preflight):

    MFU = useful model FLOPs of the step / (step time x devices x peak FLOP/s per device)

where useful FLOPs count real tokens and real images of the batch (`mm1_jax.flops`), and the
peak is the accelerator's datasheet figure (dense bf16 for TPUs and GPUs) or, on a CPU, one
derived from the instruction set the processor reports:

    cores x FMA pipes x float32 lanes per pipe x 2 FLOPs per FMA x clock

The derivation is returned with the figure so that every record can print it. A measured
matmul rate is a different figure ("fraction of measured matmul rate") and is named so.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import jax

# Dense bf16 FLOP/s per chip, from the vendors' datasheets.
TPU_PEAK = {"v4": 275e12, "v5p": 459e12, "v5litepod": 197e12, "v5e": 197e12, "v6e": 918e12}
GPU_PEAK = {  # device_kind substrings, most specific first; dense bf16 (no sparsity)
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12,
}


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_s: float  # per device
  derivation: str  # how the figure was obtained, printable


def _cpuinfo() -> dict[str, str]:
  info: dict[str, str] = {}
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if ":" in line:
        k, v = (s.strip() for s in line.split(":", 1))
        info.setdefault(k, v)  # the first processor's entry
  except OSError:
    pass
  return info


def cpu_clock_hz(info: dict[str, str] | None = None) -> tuple[float | None, str]:
  """The cores' rated clock: cpufreq's maximum where the kernel exposes it, else /proc/cpuinfo's
  'cpu MHz' (on virtual machines the nominal clock; turbo is then not counted)."""
  f = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
  try:
    return int(f.read_text()) * 1e3, "cpufreq cpuinfo_max_freq"
  except (OSError, ValueError):
    pass
  info = _cpuinfo() if info is None else info
  if "cpu MHz" in info:
    return float(info["cpu MHz"]) * 1e6, "/proc/cpuinfo 'cpu MHz'"
  return None, "no clock found"


def cpu_vector_units(flags: set[str], vendor: str) -> tuple[int, int, str]:
  """(FMA pipes per core, float32 lanes per pipe, reason) from the ISA flags.

  AVX-512 parts from AMD before Zen 5 (no avx512_vp2intersect) execute 512-bit FMAs on two
  256-bit pipes, so their throughput is that of AVX2.
  """
  if "avx512f" in flags:
    if vendor == "AuthenticAMD" and "avx512_vp2intersect" not in flags:
      return 2, 8, "AVX-512 on AMD Zen 4 (two 256-bit FMA pipes)"
    return 2, 16, "AVX-512 (two 512-bit FMA pipes)"
  if "avx2" in flags and "fma" in flags:
    return 2, 8, "AVX2 + FMA (two 256-bit FMA pipes)"
  if "avx" in flags:
    return 1, 8, "AVX without FMA (one 256-bit multiply-add pair counted as one pipe)"
  return 1, 4, "SSE (one 128-bit pipe)"


def cpu_peak(cores: int | None = None) -> Peak:
  """Float32 peak of the CPU cores this process may use."""
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  vendor = info.get("vendor_id", "")
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  pipes, lanes, why = cpu_vector_units(flags, vendor)
  clock, clock_src = cpu_clock_hz(info)
  if clock is None:
    raise RuntimeError("cannot derive the CPU's peak FLOP/s: no clock in cpufreq or /proc/cpuinfo")
  peak = cores * pipes * lanes * 2 * clock
  return Peak(peak, f"{cores} cores x {pipes} FMA pipes x {lanes} float32 lanes x 2 FLOPs x "
                    f"{clock / 1e9:.3f} GHz ({clock_src}) = {peak / 1e9:.1f} GFLOP/s; {why}")


def device_peak(device=None) -> Peak:
  """Peak FLOP/s of one device of `device`'s kind (default: jax's first device).

  CPU: the figure is for all the cores together, since XLA runs one CPU device over all of
  them. Unknown accelerators raise: a guessed peak would make an MFU that means nothing.
  """
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    p = cpu_peak()
    n = jax.local_device_count()
    if n > 1:  # forced host devices share the cores
      return Peak(p.flops_per_s / n, p.derivation + f"; shared by {n} host devices")
    return p
  kind = getattr(device, "device_kind", "")
  if device.platform == "tpu":
    m = re.search(r"v(\d)([a-z]*)", kind.lower())
    key = {"v4": "v4", "v5p": "v5p", "v5lite": "v5e", "v5e": "v5e", "v6lite": "v6e", "v6e": "v6e"}.get(
        m.group(0) if m else "", None) if m else None
    if key:
      return Peak(TPU_PEAK[key], f"TPU {key} datasheet, dense bf16: {TPU_PEAK[key] / 1e12:.0f} TFLOP/s")
  for name, value in GPU_PEAK.items():
    if name in kind:
      return Peak(value, f"{name} datasheet, dense bf16: {value / 1e12:.0f} TFLOP/s")
  raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; pass peak_flops_per_device")
