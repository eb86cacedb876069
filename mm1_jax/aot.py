"""`mm1-aot`: compile the real train step for a Cloud TPU topology on a CPU machine.

Before TPU hours are spent, the step is built for the target topology with the TPU
compiler (libtpu, the `tpu` extra) through jax.experimental.topologies, with
JAX_PLATFORMS=cpu; nothing runs on a TPU. The report gives per-chip memory against
the chip's HBM, whether the step fits, model FLOPs, the compiler's FLOPs and
roofline step time, and projected tokens/s and MFU.

  JAX_PLATFORMS=cpu mm1-aot --gin_file=gin/pods/mm1_7b_v5p-256.gin [--topology=v5p-256]
      [--num_slices=2] [--json_out=F]

Reading the compiler's cost (see also docs/pods.md):
- Memory comes from the scanned program, as it will run.
- `cost_analysis()` counts a loop body once, so a scanned layer stack reports about
  one layer's work. FLOPs and the roofline time are therefore taken from two or three
  small unrolled compiles (a few encoder and decoder layers) and extrapolated linearly
  per layer, with windowed-einsum rewrites of FSDP collectives turned off so that no
  loop hides work there either.
- `optimal_seconds` is the compiler's roofline estimate per chip; it leaves out
  inter-chip communication, so the projected MFU is an upper bound.
- Ops the cost model cannot cost add -1.0 s each to `optimal_seconds`: on v5p the two
  custom calls that prepare a scatter offloaded to the SparseCores (an MoE router's top_k
  gradient). Each costing point is corrected before the extrapolation: the sentinels are
  added back and the offloaded calls priced at their bytes over HBM bandwidth
  (`uncostable_ops`, `cost_correction`; the report's `cost_correction` says by how much).
- v4 topologies are described per TensorCore (two devices a chip); the report counts
  chips and gives each core half a chip's HBM and peak.

Exit codes: 0 fits; 1 does not fit; 2 bad arguments (unknown topology, no libtpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

import flax.linen as nn
import gin
import jax
from jax.experimental import topologies

from mm1_jax import flops as flops_lib
from mm1_jax import gin_cli, optim, sharding, train
from mm1_jax import params as params_lib
from mm1_jax.data import highres
from mm1_jax.hardware import TPU_PEAK

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # as in accelerator-type names: v4, v5p, v5litepod, v6e
  topology_prefix: str  # as get_topology_desc wants it
  hbm_bytes: int  # per chip
  peak_flops: float  # bf16 dense, per chip
  name_counts_cores: bool  # v4-8 / v5p-8 count TensorCores (2 a chip); v5e / v6e count chips
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  hbm_bandwidth: float  # bytes/s per chip (Cloud TPU datasheets); prices ops the cost model cannot cost


CHIPS = {
    "v4": Chip("v4", "v4", 32 * GIB, TPU_PEAK["v4"], True, 3, 1200e9),
    "v5p": Chip("v5p", "v5", 95 * GIB, TPU_PEAK["v5p"], True, 3, 2765e9),
    "v5litepod": Chip("v5litepod", "v5e", 16 * GIB, TPU_PEAK["v5litepod"], False, 2, 819e9),
    "v5e": Chip("v5e", "v5e", 16 * GIB, TPU_PEAK["v5e"], False, 2, 819e9),
    "v6e": Chip("v6e", "v6e", 32 * GIB, TPU_PEAK["v6e"], False, 2, 1640e9),
}
# Chips -> the physical topology Cloud TPU gives that slice size.
TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. v5p-256
  chip: Chip
  num_chips: int  # per slice
  topology_name: str  # e.g. v5:4x8x8

  @property
  def devices_per_chip(self) -> int:
    return 2 if self.chip.generation == "v4" else 1


def parse_topology(name: str) -> Topology:
  """Cloud TPU accelerator types (v4-8, v5p-256, v5litepod-16, v6e-64) -> a Topology."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip())
  if not m:
    known = ", ".join(["v4-N", "v5p-N", "v5litepod-N", "v6e-N"])
    raise ValueError(f"unknown TPU topology {name!r}; give an accelerator type ({known}), e.g. v5p-256")
  chip, count = CHIPS[m.group(1)], int(m.group(2))
  chips = count // 2 if chip.name_counts_cores else count
  shapes = TORUS_3D if chip.dims == 3 else GRID_2D
  if chips not in shapes or (chip.name_counts_cores and count % 2):
    sizes = sorted(k * (2 if chip.name_counts_cores else 1) for k in shapes)
    raise ValueError(f"{name}: no {m.group(1)} slice of that size; sizes: {sizes}")
  return Topology(name, chip, chips, f"{chip.topology_prefix}:{shapes[chips]}")


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The TPU devices of the topology, from libtpu's description (no TPU needed)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  if topology.chip.dims == 2 and topology.num_chips < 8:
    kwargs["chips_per_host_bounds"] = (min(2, topology.num_chips), min(2, topology.num_chips), 1)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name, **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise SystemExit("mm1-aot needs libtpu: pip install -e '.[tpu]' (and run with JAX_PLATFORMS=cpu)") from e
    # libtpu serves one process at a time (a lock file): a second mm1-aot fails here.
    raise SystemExit(f"mm1-aot: libtpu could not describe {topology.topology_name} ({e}); is another "
                     "process using libtpu?") from e
  return list(desc.devices)


# --- compiling ---------------------------------------------------------------

COSTING_OPTIONS = {  # no windowed-einsum loops in the costing compiles (their bodies count once)
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


# --- ops libtpu's cost model cannot cost ---------------------------------------
#
# On v5p (libtpu 0.0.42) XLA offloads some scatters to the chip's SparseCores: the MoE
# router's top_k has a scatter-add as its gradient. Each offloaded call appears in the
# program as a `call-start` / `call-done` pair on async_execution_thread="sparsecore",
# prepared by two custom calls, PrepareAsyncCallStart and PrepareAsyncCallDone, and the
# cost model adds -1.0 s to `optimal_seconds` for each of those two (checked on tiny
# compiles for v5:2x2x1 and v5:4x4x8: a jitted f32 scatter-add costs -2.0 s, two of them
# -4.0 s, and the same scatter with xla_tpu_enable_offloading_scatter_to_sparsecore=false
# a few microseconds). `cost_correction` adds 1.0 s back for each of them and then prices
# each offloaded call explicitly, as if it ran serially on the chip's HBM bandwidth: its
# operands read and its result written once (an upper bound for a scatter, which touches
# only the indexed rows; SparseCore work may also overlap the TensorCore's).

SENTINEL_SECONDS = 1.0  # what the cost model adds (negated) per op it cannot cost
SENTINEL_TARGETS = ("PrepareAsyncCallStart", "PrepareAsyncCallDone")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _type_bytes(hlo_type: str) -> int:
  """Bytes of every array in an HLO type string (a shape or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def uncostable_ops(hlo: str) -> dict:
  """The ops of a compiled program (`compiled.as_text()`) that libtpu's cost model counts
  as -1.0 s each, and the SparseCore calls they prepare.

  Returns {"sentinel_ops": the number of PrepareAsyncCallStart / PrepareAsyncCallDone
  custom calls, "sparsecore_calls": the offloaded calls they prepare, "sparsecore_bytes":
  those calls' operand and result bytes}.
  """
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
  sentinels = sum(t in SENTINEL_TARGETS for t in targets)
  prepared = set(re.findall(r'%([\w.\-]+) = \S+ custom-call\([^)]*\),[^\n]*custom_call_target="PrepareAsyncCallDone"',
                            hlo))
  calls, nbytes = 0, 0
  for m in re.finditer(r'^\s*(?:ROOT )?%[\w.\-]+ = (.*?) call-start\(([^)]*)\)(.*)$', hlo, re.M):
    operands = {o.strip().lstrip("%") for o in m.group(2).split(",")}
    if 'async_execution_thread="sparsecore"' in m.group(3) and operands & prepared:
      calls += 1
      nbytes += _type_bytes(m.group(1))
  return {"sentinel_ops": sentinels, "sparsecore_calls": calls, "sparsecore_bytes": nbytes}


def cost_correction(ops: dict, hbm_bandwidth: float) -> dict:
  """Seconds to add to a program's `optimal_seconds` for its uncostable ops (`uncostable_ops`):
  the sentinels back, and the offloaded calls' bytes over the chip's HBM bandwidth."""
  added_back = ops["sentinel_ops"] * SENTINEL_SECONDS
  estimate = ops["sparsecore_bytes"] / hbm_bandwidth
  return {**ops, "sentinel_seconds_added_back": added_back, "sparsecore_estimate_seconds": estimate,
          "seconds": added_back + estimate}


@dataclasses.dataclass
class Compiled:
  memory: dict | None  # bytes per device
  flops: float | None  # per device
  optimal_seconds: float | None  # as the cost model reports it
  error: str | None = None
  compile_s: float = 0.0
  uncostable: dict | None = None  # uncostable_ops() of the program

  def corrected_seconds(self, hbm_bandwidth: float) -> float | None:
    """optimal_seconds with cost_correction() applied."""
    if self.optimal_seconds is None or self.uncostable is None:
      return self.optimal_seconds
    return self.optimal_seconds + cost_correction(self.uncostable, hbm_bandwidth)["seconds"]


def _compile(model_config, optimizer, mesh_config, devices, batch_size, seq_len, max_images,
             options=None, hlo_out: Path | None = None) -> Compiled:
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = mesh_config.rules
  model = model_config.build()
  tx, schedule = optim.make_optimizer(optimizer, 1000)
  # Parameter shapes do not depend on the batch: initialise from a one-row example, and
  # describe the real batch abstractly (MM1's is gigabytes of pixels).
  small = train.dummy_batch(1, 8, 1, model_config)
  abstract_state, state_shardings = train.abstract_train_state(model, tx, small, mesh, rules)
  s = model_config.encoder.image_size
  shapes = {k: ((batch_size, seq_len), v.dtype) for k, v in small.items() if k != "images"}
  shapes["images"] = ((batch_size, max_images, s, s, 3), small["images"].dtype)
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, len(shape)) for k, (shape, _) in shapes.items()}
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shardings[k]) for k, (shape, dtype) in shapes.items()}
  step = train.make_train_step(model, tx, schedule, state_shardings, batch_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = step.lower(abstract_state, batch)
  try:
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  except Exception as e:  # noqa: BLE001
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "HbmOom" in msg or "Ran out of memory" in msg:
      return Compiled(None, None, None, error=msg, compile_s=time.perf_counter() - t0)
    raise
  text = compiled.as_text()
  if hlo_out is not None:
    hlo_out.parent.mkdir(parents=True, exist_ok=True)
    hlo_out.write_text(text)
  mem = compiled.memory_analysis()
  memory = None
  if mem is not None:
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
              ("argument", "output", "alias", "temp", "generated_code")}
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                       + memory["generated_code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return Compiled(memory, cost.get("flops"), cost.get("optimal_seconds"), compile_s=time.perf_counter() - t0,
                  uncostable=uncostable_ops(text))


def _with_depths(config, enc_depth: int, dec_depth: int):
  """The same model with other depths, unrolled (for costing). AIM (v1) has no decoder."""
  enc = dataclasses.replace(config.encoder, depth=enc_depth, scan_layers=False)
  if not hasattr(config, "decoder"):
    return dataclasses.replace(config, encoder=enc)
  dec = dataclasses.replace(config.decoder, depth=dec_depth, scan_layers=False)
  return dataclasses.replace(config, encoder=enc, decoder=dec)


def extrapolated_cost(model_config, compile_fn, hbm_bandwidth: float | None = None) -> dict:
  """Per-device flops and optimal_seconds of the full-depth step, from unrolled compiles
  at (a, b), (2a, b) and (a, 2b) encoder / decoder layers, linear per layer.

  With `hbm_bandwidth` (bytes/s a chip) each point's optimal_seconds is first corrected for
  the ops the cost model cannot cost (`cost_correction`); `correction` gives the terms of
  that correction extrapolated the same way (None when no point needed one)."""
  decoder = getattr(model_config, "decoder", None)
  le, ld = model_config.encoder.depth, decoder.depth if decoder is not None else 0
  moe = decoder.moe if decoder is not None else None
  unit = moe.every if moe is not None else 1  # a sparse stack repeats in groups of `every`
  a, b = min(2, le), min(unit * max(1, 2 // unit), ld)
  b = b or 1  # no decoder: its term is zero (dec2 is base)
  base = compile_fn(_with_depths(model_config, a, b))
  enc2 = compile_fn(_with_depths(model_config, 2 * a, b)) if le > a else base
  dec2 = compile_fn(_with_depths(model_config, a, 2 * b)) if ld > b else base
  compiled = (base, enc2, dec2)
  fix = [cost_correction(c.uncostable, hbm_bandwidth) if hbm_bandwidth and c.uncostable else None
         for c in compiled]
  out = {"points": []}
  for ((e, d), c, f) in zip(((a, b), (2 * a, b), (a, 2 * b)), compiled, fix):
    point = {"encoder_layers": e, "decoder_layers": d, "flops": c.flops, "optimal_seconds": c.optimal_seconds}
    if f is not None and f["sentinel_ops"]:
      point["uncostable"] = f
      point["corrected_seconds"] = None if c.optimal_seconds is None else c.optimal_seconds + f["seconds"]
    out["points"].append(point)

  def extrapolate(c0, ce, cd):
    return c0 + (le - a) / a * (ce - c0) + (ld - b) / b * (cd - c0)

  seconds = [None if c.optimal_seconds is None else c.optimal_seconds + (f["seconds"] if f else 0.0)
             for c, f in zip(compiled, fix)]
  for key, values in (("flops", [c.flops for c in compiled]), ("optimal_seconds", seconds)):
    if None in values or min(values) < 0:
      # Ops the cost model cannot cost count as -1 s each; one left uncorrected leaves no
      # honest estimate.
      out[key] = None
      continue
    out[key] = extrapolate(*values)
  # The full-depth time by part, on the same per-layer model: all encoder layers, all decoder
  # layers, and what neither stack's depth changes (embeddings, connector, head, optimizer).
  if out.get("optimal_seconds") is not None:
    t0, te, td = seconds
    enc, dec = le / a * (te - t0) if le > a else None, ld / b * (td - t0) if ld > b else None
    out["split"] = {"image_encoder_seconds": enc, "decoder_seconds": dec,
                    "rest_seconds": None if enc is None or dec is None else out["optimal_seconds"] - enc - dec}
  out["correction"] = None
  if any(f and f["sentinel_ops"] for f in fix):
    out["correction"] = {k: extrapolate(*(f[k] if f else 0 for f in fix))
                         for k in ("sentinel_ops", "sparsecore_calls", "sparsecore_bytes",
                                   "sentinel_seconds_added_back", "sparsecore_estimate_seconds", "seconds")}
  out["compile_s"] = sum(c.compile_s for c in {id(c): c for c in compiled}.values())
  return out


def preflight(*, model, optimizer, mesh, topology: str | None, num_slices: int = 1, batch_size: int = 512,
              seq_len: int = 4096, max_images: int = 16, subimages=None, cost: bool = True,
              padding_fraction: float = 0.0, images_per_sequence: float | None = None,
              progress: bool = True, hlo_dir: str | None = None) -> dict:
  """Compiles the train step for the topology and returns the report (see module docstring).

  With `hlo_dir`, each compiled program's optimized HLO is written there as text: the step
  (`step.hlo.txt`) and each costing compile (`cost_encoder<E>_decoder<D>.hlo.txt`).

  With `subimages` (high-resolution SFT) every image takes K slots: the step is compiled
  for max_images x K image slots a sequence, as the loader feeds it.

  MFU is reported twice: `projected_mfu` counts the useful work the loader is expected to
  deliver (`padding_fraction` of the tokens are padding, `images_per_sequence` real images a
  row, default every slot; one segment a row, so the causal attention pairs are an upper
  bound when rows are packed), `projected_mfu_slots` every token and image slot.
  """
  slots = max_images * highres.per_image(subimages)

  if not topology:
    raise ValueError("no topology: pass --topology=v5p-256 (or set TOPOLOGY in the gin file)")
  topo = parse_topology(topology)
  say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)  # noqa: E731
  devices = topology_devices(topo, num_slices)
  if num_slices > 1:
    mesh = dataclasses.replace(mesh, dcn_shape=(num_slices, 1, 1, 1))
  say(f"[1/2] compiling the train step for {topology} x{num_slices} ({len(devices)} devices)")
  hlo = Path(hlo_dir) if hlo_dir else None
  full = _compile(model, optimizer, mesh, devices, batch_size, seq_len, slots,
                  hlo_out=hlo and hlo / "step.hlo.txt")
  per_device_hbm = topo.chip.hbm_bytes // topo.devices_per_chip
  report = {
      "topology": topology, "topology_name": topo.topology_name, "num_slices": num_slices,
      "num_chips": topo.num_chips * num_slices, "num_devices": len(devices),
      "mesh": mesh.global_shape(len(devices)), "batch_size": batch_size, "seq_len": seq_len,
      "max_images": max_images, "image_slots": slots, "tokens_per_step": batch_size * seq_len,
      "hbm_bytes": topo.chip.hbm_bytes, "hbm_bytes_per_device": per_device_hbm,
      "peak_flops_per_chip": topo.chip.peak_flops, "compile_s": round(full.compile_s, 1),
  }
  abstract = params_lib.abstract_params(model)
  counts = params_lib.count_parameters(model, abstract)
  report["params_total"] = counts["total"]
  report["params_active"] = counts.get("total.active", counts["total"])
  if full.error is not None:
    report.update(fits=False, per_chip_bytes=_oom_bytes(full.error), memory=None,
                  error=full.error.splitlines()[0][:500])
  else:
    report.update(fits=full.memory["total"] <= per_device_hbm,
                  per_chip_bytes=full.memory["total"] * topo.devices_per_chip, memory=full.memory)
  report["model_flops_per_step"] = flops_lib.train_flops_per_step(abstract, model, batch_size, seq_len, slots)
  real_tokens = seq_len * (1.0 - padding_fraction)
  real_images = slots if images_per_sequence is None else min(images_per_sequence * highres.per_image(subimages),
                                                              slots)
  useful = flops_lib.Work(tokens=batch_size * real_tokens, images=batch_size * real_images,
                          attention_pairs=batch_size * real_tokens ** 2 / 2)
  report["assumed"] = {"padding_fraction": padding_fraction, "images_per_sequence": real_images,
                       "attention": "causal, T^2/2 pairs a row of T real tokens (one segment)"}
  report["useful_flops_per_step"] = flops_lib.train_flops(abstract, model, useful)
  report.update(xla_flops=None, optimal_seconds=None, tokens_per_s_per_chip=None, projected_mfu=None,
                useful_tokens_per_s_per_chip=None, projected_mfu_slots=None)
  if cost:
    say("[2/2] costing: small unrolled compiles, extrapolated per layer")
    def hlo_name(cfg):  # AIM (v1) has no decoder
      if not hlo:
        return None
      dec = cfg.decoder.depth if hasattr(cfg, "decoder") else 0
      return hlo / f"cost_encoder{cfg.encoder.depth}_decoder{dec}.hlo.txt"
    est = extrapolated_cost(model, lambda cfg: _compile(cfg, optimizer, mesh, devices, batch_size, seq_len,
                                                         slots, options=COSTING_OPTIONS, hlo_out=hlo_name(cfg)),
                            hbm_bandwidth=topo.chip.hbm_bandwidth / topo.devices_per_chip)
    report["cost_compile_s"] = round(est["compile_s"], 1)
    report["cost_points"] = est["points"]
    if est["correction"] is not None:
      c = est["correction"]
      report["cost_correction"] = {
          **c, "hbm_bandwidth_per_chip": topo.chip.hbm_bandwidth,
          "note": (f"optimal_seconds corrected for ops libtpu's cost model cannot cost: {c['sentinel_ops']:.0f} "
                   f"PrepareAsyncCallStart/Done custom calls (SparseCore offloads) at -1 s each, "
                   f"{c['sentinel_seconds_added_back']:.1f} s added back; the {c['sparsecore_calls']:.0f} offloaded "
                   f"calls priced at their {c['sparsecore_bytes'] / 2**20:.1f} MiB over HBM bandwidth "
                   f"({topo.chip.hbm_bandwidth / 1e9:.0f} GB/s a chip), +{c['sparsecore_estimate_seconds'] * 1e3:.3f} ms "
                   "(full-depth figures, extrapolated per layer)")}
    if est["optimal_seconds"] is None:
      report["cost_note"] = ("no step-time projection: libtpu's cost model returned a negative time "
                             "(ops it cannot cost count as -1 s each)")
    if est["flops"] is not None:
      report["xla_flops"] = est["flops"] * len(devices)  # whole step, all devices
    if est["optimal_seconds"]:
      t = est["optimal_seconds"]
      report["optimal_seconds"] = t
      report["step_split"] = {**est["split"], **{
          k.replace("_seconds", "_share"): None if v is None else v / t for k, v in est["split"].items()}}
      chip_s = t * report["num_chips"]
      report["tokens_per_s_per_chip"] = batch_size * seq_len / chip_s
      report["useful_tokens_per_s_per_chip"] = batch_size * real_tokens / chip_s
      report["projected_mfu"] = report["useful_flops_per_step"] / (chip_s * topo.chip.peak_flops)
      report["projected_mfu_slots"] = report["model_flops_per_step"] / (chip_s * topo.chip.peak_flops)
  return report


def _oom_bytes(message: str) -> int | None:
  """The bytes a compile-time OOM message says are needed, if it gives a figure."""
  scale = {"T": 1024 ** 4, "G": GIB, "M": 1024 ** 2, "K": 1024}
  for pattern in (r"Used ([\d.]+)([TGMK])i?B? of ([\d.]+)([TGMK])", r"temporaries \(([\d.]+)([TGMK])\)"):
    m = re.search(pattern, message)
    if m:
      return int(float(m.group(1)) * scale[m.group(2)])
  return None


def format_report(r: dict) -> str:
  gib = lambda b: "-" if b is None else f"{b / GIB:.2f} GiB"  # noqa: E731
  rows = [
      ("topology", f"{r['topology']} ({r['topology_name']}) x{r['num_slices']} slice(s)"),
      ("chips", f"{r['num_chips']} ({r['num_devices']} devices)"),
      ("mesh", ", ".join(f"{k}={v}" for k, v in r["mesh"].items())),
      ("batch", f"{r['batch_size']} x {r['seq_len']} tokens, up to {r['max_images']} images a sequence"
                + (f" ({r['image_slots']} sub-image slots)" if r.get("image_slots", r["max_images"]) != r["max_images"]
                   else "")),
      ("parameters", f"{r['params_total'] / 1e9:.2f} B total, {r['params_active'] / 1e9:.2f} B active"),
      ("per-chip memory", gib(r["per_chip_bytes"]) + f" of {gib(r['hbm_bytes'])} HBM"),
  ]
  if r.get("memory"):
    m = r["memory"]
    rows.append(("  per device", f"arguments {gib(m['argument'])}, temporaries {gib(m['temp'])}, "
                                 f"output {gib(m['output'])}, aliased {gib(m['alias'])}"))
  rows.append(("fits", "yes" if r["fits"] else "NO" + (f": {r.get('error', '')[:120]}" if r.get("error") else "")))
  a = r.get("assumed", {})
  rows.append(("model FLOPs / step", f"{r['model_flops_per_step']:.3e} every slot; "
                                     f"{r['useful_flops_per_step']:.3e} useful (padding "
                                     f"{a.get('padding_fraction', 0):.0%}, {a.get('images_per_sequence', 0):.1f} "
                                     "images a row)"))
  if r.get("xla_flops") is not None:
    rows.append(("compiler FLOPs / step", f"{r['xla_flops']:.3e}"))
  if r.get("cost_note"):
    rows.append(("roofline step time", r["cost_note"]))
  if r.get("cost_correction"):
    rows.append(("  cost correction", r["cost_correction"]["note"]))
  if r.get("optimal_seconds"):
    rows += [("roofline step time", f"{r['optimal_seconds']:.3f} s (no communication)"),
             ("tokens/s per chip", f"{r['tokens_per_s_per_chip']:,.0f} slots, "
                                   f"{r['useful_tokens_per_s_per_chip']:,.0f} real"),
             ("projected MFU", f"{r['projected_mfu']:.1%} useful work, {r['projected_mfu_slots']:.1%} every "
                               "slot (bf16 datasheet peak; no communication)")]
    split = r.get("step_split") or {}
    if split.get("image_encoder_share") is not None and split.get("decoder_share") is not None:
      rows.append(("  by part", f"image encoder {split['image_encoder_share']:.1%}, decoder "
                                f"{split['decoder_share']:.1%}, the rest {split['rest_share']:.1%} "
                                "(per-layer extrapolation)"))
  rows.append(("compile", f"{r['compile_s']} s" + (f" + {r['cost_compile_s']} s costing"
                                                   if "cost_compile_s" in r else "")))
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  p = argparse.ArgumentParser(prog="mm1-aot", description=__doc__)
  gin_cli.add_gin_flags(p, example="gin/pods/mm1_7b_v5p-256.gin")
  p.add_argument("--topology", default=None,
                 help="Cloud TPU accelerator type: v4-8, v5p-256, v5litepod-256, v6e-64, ... "
                      "(default: the gin file's TOPOLOGY)")
  p.add_argument("--num_slices", type=int, default=None, help="slices over the data-centre network")
  p.add_argument("--json_out", default=None, help="also write the report as JSON here")
  p.add_argument("--no_cost", action="store_true", help="memory only: skip the costing compiles")
  p.add_argument("--hlo_dir", default=None,
                 help="write each compiled program's optimized HLO text here (the step, the costing compiles)")
  args = p.parse_args(rest)
  if args.topology:
    try:
      parse_topology(args.topology)
    except ValueError as e:
      p.error(str(e))
  gin_cli.parse(args, bindings)
  kwargs = {}
  if args.topology:
    kwargs["topology"] = args.topology
  if args.num_slices:
    kwargs["num_slices"] = args.num_slices
  if args.hlo_dir:
    kwargs["hlo_dir"] = args.hlo_dir
  # The registered function: under `python -m mm1_jax.aot` this module is __main__,
  # a second copy whose `preflight` gin does not know.
  aot_lib = sys.modules.get("mm1_jax.aot") or importlib.import_module("mm1_jax.aot")
  try:
    report = gin.get_configurable(aot_lib.preflight)(cost=not args.no_cost, **kwargs)
  except ValueError as e:
    message = str(e).split("\n  In call to configurable")[0]  # gin's addition: no news here
    print(f"mm1-aot: {message}", file=sys.stderr)
    return 2
  print(format_report(report))
  if args.json_out:
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("aot"))
