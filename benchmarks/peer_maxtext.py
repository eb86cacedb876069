"""mm1_jax against MaxText on the same shapes, compiled by the same TPU compiler, in one run.

  python benchmarks/peer_maxtext.py --setup                     # once: the Python 3.12 environment
  python benchmarks/peer_maxtext.py --pair=llama2-7b_v5p-64     # compile both, write the record
  python benchmarks/peer_maxtext.py --pair=llama2-7b_v5p-64 --mm1_lever=base --mm1_lever=splash

MaxText (PyPI `maxtext[tpu]`, pinned below) and jax >= 0.11 need Python >= 3.12, so `--setup`
makes a separate virtual environment (VENV, default ~/.cache/mm1_jax/maxtext-venv) from the
pyenv 3.12 interpreter and installs MaxText there with the jax it pins, the libtpu of jax's
own `tpu` extra, mm1_jax's tokamax (one splash kernel for both), gin-config and seqio; mm1_jax is not installed there (its own pins are jax < 0.11): this checkout
is put on PYTHONPATH, so both programs are compiled by that environment's jax and libtpu.
Nothing of MaxText is copied: its own `train_compile` module is run and its printed
`cost_analysis()` / `memory_analysis()` are read.

For each side, the method of `mm1-aot` (mm1_jax/aot.py):
- memory: the full-depth scanned program, per chip;
- FLOPs and roofline step time (`optimal_seconds`): unrolled compiles with the
  windowed-einsum rewrites of FSDP collectives off, extrapolated linearly per layer to the
  full depth: MaxText at 4 and 8 decoder layers; mm1-aot at 2 and 4 (and 2 and 4 encoder
  layers, whose term is empty text-only).
MaxText is compiled twice: as shipped (jax's splash kernel, which has no cost estimate, so
the cost model counts its attention as zero: that projection leaves attention out) and with
`use_tokamax_splash=True` (tokamax's kernel, mm1_jax's, costed): ratios are against the
second. Throughput is tokens a step over (chips x step time). MFU uses one FLOP count for both:
mm1_jax's useful FLOPs of the model at this shape (mm1_jax/flops.py, causal attention at
T^2/2 pairs a row), over the chips' bf16 peak; the two decoders have the same shape and the
same work. Text-only, mm1_jax's step still carries the image tower's parameters and
optimizer state (no images run through it): its argument memory is larger by those. The
roofline leaves out inter-chip communication on both sides. mm1_jax is compiled here under
jax 0.12, outside its own pin (jax < 0.11; the record's `packages` are this process's,
`figures.environment` the compiling environment's).

Pairs:
  llama2-7b_v5p-64  MaxText llama2-7b against MM1-7B's decoder, text-only: v5p-64 (32 chips),
                    4 x 4,096 tokens a chip, pure FSDP, full remat, bf16 compute with float32
                    weights (MaxText's defaults for the last two).
  mixtral-8x7b_v5p-128
                    MaxText mixtral-8x7b (dropless, megablox grouped matmuls) against MM1's
                    decoder of Mixtral's shape (gin/models/mm1_mixtral_8x7b.gin, dropless),
                    text-only: v5p-128 (64 chips), otherwise as above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from benchmarks import record, tpu_levers  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "peer_maxtext"
VENV = Path(os.environ.get("MAXTEXT_VENV", Path.home() / ".cache" / "mm1_jax" / "maxtext-venv"))
MAXTEXT = "maxtext[tpu]==0.2.5"
# jax's `tpu` extra pins the libtpu it was built against (0.0.50.1 for 0.12.0.1); maxtext[tpu]
# alone resolves libtpu 0.0.52, which rejects the custom-call configs this jax writes. The
# tokamax of mm1_jax's `tpu` extra: both sides run the same splash kernel (0.0.17, which
# maxtext resolves, writes Mosaic bytecode libtpu 0.0.50.1 cannot read). What mm1_jax's
# compile needs beyond MaxText's environment: gin-config, and seqio with TensorFlow (the pod
# gin files import the data pipeline).
EXTRA = ("jax[tpu]==0.12.0.1", "gin-config==0.5.0", "seqio==0.0.20", "tensorflow==2.21.*")
# maxtext 0.2.5 requires a newer tokamax than the one both sides run: installed after it,
# without its dependencies, and with the one of them maxtext's tokamax resolves differently
# (0.0.12 pins typeguard 2.13.3; under 4.x its jaxtyping annotations fail to import).
TOKAMAX = ("tokamax==0.0.12", "typeguard==2.13.3")
PYTHON312 = "3.12.1"  # the pyenv version `python3.12` runs as
NO_WINDOWED_EINSUM = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")
VENV_PACKAGES = ("jax", "jaxlib", "libtpu", "maxtext", "tokamax", "flax", "optax", "orbax-checkpoint")

PAIRS = {
    "llama2-7b_v5p-64": {
        "maxtext": ["model_name=llama2-7b", "override_model_config=True", "compile_topology=v5p-64", "compile_topology_num_slices=1",
                    "per_device_batch_size=4", "max_target_length=4096", "remat_policy=full",
                    "ici_fsdp_parallelism=-1", "dtype=bfloat16", "weight_dtype=float32"],
        # MaxText as shipped runs jax's splash kernel, which carries no cost estimate: the
        # compiler's cost model counts its attention as zero FLOPs and zero time, so that
        # projection leaves attention out. use_tokamax_splash=True runs tokamax's kernel,
        # the one mm1_jax runs, which carries one: the comparable figure.
        "maxtext_variants": {"as_shipped": [], "tokamax_splash": ["use_tokamax_splash=True"]},
        "compare_with": "tokamax_splash",
        "depth": 32, "chips": 32, "tokens_per_step": 128 * 4096,
        "mm1_study": "mm1_7b_text_v5p-64", "mm1_levers": ["einsum", "splash"],
    },
    "mixtral-8x7b_v5p-128": {
        # Dropless MoE through megablox's grouped matmul (MaxText's defaults, spelled out).
        "maxtext": ["model_name=mixtral-8x7b", "override_model_config=True", "compile_topology=v5p-128",
                    "compile_topology_num_slices=1", "per_device_batch_size=4", "max_target_length=4096",
                    "remat_policy=full", "ici_fsdp_parallelism=-1", "dtype=bfloat16", "weight_dtype=float32",
                    "megablox=True", "sparse_matmul=True", "capacity_factor=-1"],
        "maxtext_variants": {"as_shipped": [], "tokamax_splash": ["use_tokamax_splash=True"]},
        "compare_with": "tokamax_splash",
        "depth": 32, "chips": 64, "tokens_per_step": 256 * 4096,
        "mm1_study": "mm1_mixtral_8x7b_text_v5p-128", "mm1_levers": ["splash", "splash_gmm_pallas"],
    },
}


def python() -> Path:
  return VENV / "bin" / "python"


def setup() -> None:
  """Creates VENV with Python 3.12 and installs MaxText and EXTRA into it."""
  if not python().exists():
    subprocess.run(["python3.12", "-m", "venv", str(VENV)], check=True,
                   env=dict(os.environ, PYENV_VERSION=PYTHON312))
  subprocess.run([str(python()), "-m", "pip", "install", "-q", MAXTEXT, *EXTRA], check=True)
  subprocess.run([str(python()), "-m", "pip", "install", "-q", "--no-deps", *TOKAMAX], check=True)
  print(json.dumps(venv_packages()))


def venv_packages() -> dict:
  code = ("import importlib.metadata as m, json, platform; out = {'python': platform.python_version()}\n"
          f"for n in {VENV_PACKAGES!r}:\n"
          "  try: out[n] = m.version(n)\n"
          "  except m.PackageNotFoundError: pass\n"
          "print(json.dumps(out))")
  return json.loads(subprocess.run([str(python()), "-c", code], check=True, capture_output=True,
                                   text=True).stdout)


def _env(**extra) -> dict:
  # Pallas kernels' debug locations off: jax 0.12.0.1 writes them into a custom-call field
  # that some libtpu releases do not parse (0.0.52 did not); the kernels compile the same
  # without them.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", PYTHONPATH=str(REPO),
             JAX_MOSAIC_UNZIP_DEBUG_LOCATIONS="false", **extra)
  # This process's jax (loaded by benchmarks.record) exports TPU_LIBRARY_PATH, its own libtpu:
  # inherited, it would make the other environment's jax load the wrong compiler.
  for name in ("PYENV_VERSION", "TPU_LIBRARY_PATH"):
    env.pop(name, None)
  return env


def parse_maxtext(stdout: str) -> dict:
  """flops, optimal_seconds and memory bytes from train_compile's printed analyses."""
  out = {}
  cost = re.search(r"^Cost analysis: (.*)$", stdout, re.M)
  if cost:
    for key in ("flops", "optimal_seconds"):
      m = re.search(rf"'{key}': ([-0-9.e+]+)", cost.group(1))
      if m:
        out[key] = float(m.group(1))
  mem = re.search(r"^Memory analysis: (.*)$", stdout, re.M)
  if mem:
    fields = dict(re.findall(r"(\w+)_size_in_bytes=(\d+)", mem.group(1)))
    memory = {k: int(fields.get(k, 0)) for k in ("argument", "output", "alias", "temp", "generated_code")}
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                       + memory["generated_code"])
    out["memory"] = memory
  return out


def compile_maxtext(args: list[str], layers: int | None, costing: bool) -> dict:
  """One train_compile run: the full scanned program (layers None) or `layers` unrolled."""
  base = subprocess.run([str(python()), "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                        check=True, capture_output=True, text=True).stdout.strip()
  depth = [] if layers is None else [f"base_num_decoder_layers={layers}", "scan_layers=False"]
  cmd = [str(python()), "-m", "maxtext.trainers.pre_train.train_compile", f"{base}/configs/base.yml",
         *args, *depth]
  env = _env(LIBTPU_INIT_ARGS=NO_WINDOWED_EINSUM if costing else "")
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(VENV))
  got = parse_maxtext(proc.stdout)
  if proc.returncode != 0 or "flops" not in got:
    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
    raise SystemExit(f"MaxText train_compile failed ({proc.returncode}): {' '.join(cmd[-4:])}")
  got["compile_s"] = round(time.perf_counter() - t0, 1)
  return got


def maxtext_side(pair: dict, variant: str) -> dict:
  args = pair["maxtext"] + pair["maxtext_variants"][variant]
  steps = [("scanned", None, False), ("unrolled_4", 4, True), ("unrolled_8", 8, True)]
  runs = {}
  for name, layers, costing in tqdm(steps, desc=f"MaxText ({variant}) compiles", unit="compile", file=sys.stderr):
    runs[name] = compile_maxtext(args, layers, costing)
  depth = pair["depth"]
  c4, c8 = runs["unrolled_4"], runs["unrolled_8"]
  extrapolate = lambda k: c4[k] + (depth - 4) / 4 * (c8[k] - c4[k])  # noqa: E731
  # A negative time is the cost model's sentinel for an op it cannot cost: no projection.
  t = extrapolate("optimal_seconds") if min(c4["optimal_seconds"], c8["optimal_seconds"]) > 0 else None
  return {"args": args, "compiles": runs, "per_chip_bytes": runs["scanned"]["memory"]["total"],
          "flops_per_chip": extrapolate("flops"), "optimal_seconds": t,
          "tokens_per_s_per_chip": None if t is None else pair["tokens_per_step"] / (t * pair["chips"])}


def mm1_side(pair: dict, levers: list[str]) -> dict:
  out = {}
  for lever in tqdm(levers, desc="mm1_jax levers", unit="lever", file=sys.stderr):
    out[lever] = tpu_levers.compile_lever(pair["mm1_study"], lever, python=str(python()), env=_env())
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--setup", action="store_true", help="create the Python 3.12 environment with MaxText")
  p.add_argument("--pair", choices=sorted(PAIRS), default="llama2-7b_v5p-64")
  p.add_argument("--mm1_lever", action="append", choices=sorted(tpu_levers.LEVERS), default=[],
                 help="mm1_jax configurations to compile (repeatable; default: the pair's mm1_levers)")
  args = p.parse_args(argv)
  if args.setup:
    setup()
    return 0
  if not python().exists():
    p.error(f"no environment at {VENV}: run with --setup first")
  pair = PAIRS[args.pair]
  git = record.git_state()
  versions = venv_packages()
  maxtext = {}
  for variant in pair["maxtext_variants"]:
    maxtext[variant] = maxtext_side(pair, variant)
    print(json.dumps({variant: {k: v for k, v in maxtext[variant].items() if k != "compiles"}}), flush=True)
  mm1 = mm1_side(pair, args.mm1_lever or pair["mm1_levers"])
  peer = maxtext[pair["compare_with"]]
  ratios = {lever: tpu_levers.ratios(r, peer) for lever, r in mm1.items()}
  for row in ratios.values():
    row["against"] = pair["compare_with"]
  useful = next(iter(mm1.values()))["useful_flops_per_step"]
  peak = next(iter(mm1.values()))["peak_flops_per_chip"]
  for m in maxtext.values():
    m["projected_mfu"] = None if m["optimal_seconds"] is None else useful / (pair["chips"] * m["optimal_seconds"] * peak)
  figures = {"pair": args.pair, "environment": versions, "maxtext": maxtext, "mm1_jax": mm1,
             "mm1_over_maxtext": ratios}
  record.write(OUT / f"{args.pair}.json", "peer_maxtext", figures, git=git)
  for lever, r in ratios.items():
    if "tokens_per_s_ratio" not in r:
      print(f"{lever}: no projection (does not fit, or no step time)")
      continue
    print(f"{lever}: {mm1[lever]['tokens_per_s_per_chip']:,.0f} tok/s/chip vs MaxText ({pair['compare_with']}) "
          f"{peer['tokens_per_s_per_chip']:,.0f} ({r['tokens_per_s_ratio']:.3f}x); memory "
          f"{mm1[lever]['per_chip_bytes'] / 2**30:.2f} vs {peer['per_chip_bytes'] / 2**30:.2f} GiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
