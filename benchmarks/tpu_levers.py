"""TPU performance levers, each compiled for its pod and costed by the TPU compiler (mm1-aot).

  JAX_PLATFORMS=cpu python benchmarks/tpu_levers.py --study=mm1_7b_text_v5p-64
  JAX_PLATFORMS=cpu python benchmarks/tpu_levers.py --study=mm1_7b_text_v5p-64 --lever=base --lever=splash
  python benchmarks/tpu_levers.py --table            # the tables of the saved records

A study is one model, batch and topology (a pod gin file plus bindings); a lever is a set of
gin bindings on top of it ("base" is none). Every lever of one invocation is compiled by the
same code and compiler, one after another, and written into one record,
results/tpu_levers/<study>.json, with each lever's mm1-aot report and its projected
tokens/s/chip and per-chip memory against the first lever run (the base). All figures are the
compiler's: per-chip memory of the scanned program, FLOPs and roofline step time
(`optimal_seconds`) extrapolated from small unrolled compiles (see mm1_jax/aot.py). The
roofline leaves out inter-chip communication, so projected throughput is an upper bound.

Studies:
  mm1_7b_text_v5p-64  MM1-7B's decoder (the llama2-7b shape) text-only on v5p-64 (32 chips),
                      4 sequences x 4,096 tokens a chip, pure FSDP, bf16 compute with float32
                      weights, full remat: the settings benchmarks/peer_maxtext.py compiles
                      MaxText's llama2-7b with, so the two compare at equal shapes.
  mm1_mixtral_8x7b_text_v5p-128
                      MM1's decoder of Mixtral-8x7B's shape (gin/models/mm1_mixtral_8x7b.gin: 8
                      experts, top-2, dropless) text-only on v5p-128 (64 chips), otherwise as
                      above: the settings of MaxText's mixtral-8x7b in benchmarks/peer_maxtext.py.
  mm1_7b_v5p-256      MM1-7B with 16 images a sequence on its pod (gin/pods/mm1_7b_v5p-256.gin).

Levers: "base" is the study's gin as it is; "einsum" and "splash" set the decoder's attention
either way (the MM1 presets default to splash); "splash_gmm_pallas" also runs a dropless MoE's
experts through the megablox kernels (mm1_jax/gmm.py) instead of jax.lax.ragged_dot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from benchmarks import preflight, record  # noqa: E402  (after the checkout is on the path)

OUT = REPO / "benchmarks" / "results" / "tpu_levers"

# MaxText's settings for a text-only pair: no images, no padding, full remat everywhere (the
# pod file keeps the decoder's projections; bound back here).
_TEXT = ["MAX_IMAGES=0", "PREFLIGHT_PADDING_FRACTION=0.0", "REMAT_POLICY='full'",
         "decoder.DecoderConfig.remat_policy='full'"]
STUDIES = {  # gin files (later ones override earlier ones), bindings
    "mm1_7b_text_v5p-64": (["gin/pods/mm1_7b_v5p-256.gin"], ["TOPOLOGY='v5p-64'", "BATCH_SIZE=128", *_TEXT]),
    "mm1_mixtral_8x7b_text_v5p-128": (["gin/pods/mm1_7b_v5p-256.gin", "gin/models/mm1_mixtral_8x7b.gin"],
                                      ["TOPOLOGY='v5p-128'", "BATCH_SIZE=256", *_TEXT]),
    "mm1_7b_v5p-256": (["gin/pods/mm1_7b_v5p-256.gin"], []),
}
LEVERS = {
    "base": [],  # the preset as it is
    "einsum": ["decoder.DecoderConfig.attention_impl='xla'"],
    "splash": ["decoder.DecoderConfig.attention_impl='splash'"],
    "splash_gmm_pallas": ["decoder.DecoderConfig.attention_impl='splash'", "moe.MoEConfig.grouped_matmul='pallas'"],
    "splash_remat_dots_no_batch": ["decoder.DecoderConfig.attention_impl='splash'",
                                   "decoder.DecoderConfig.remat_policy='dots_no_batch'"],
    "splash_remat_dots": ["decoder.DecoderConfig.attention_impl='splash'",
                          "decoder.DecoderConfig.remat_policy='dots'"],
    "splash_remat_none": ["decoder.DecoderConfig.attention_impl='splash'",
                          "decoder.DecoderConfig.remat_policy='none'"],
}
# Levers that bind the MoE layer: only for studies whose decoder has one (elsewhere gin knows no
# moe.MoEConfig, and the lever would change nothing).
MOE_LEVERS = tuple(name for name, bindings in LEVERS.items() if any(b.startswith("moe.") for b in bindings))
MOE_STUDIES = ("mm1_mixtral_8x7b_text_v5p-128",)
SUMMARY = ("per_chip_bytes", "fits", "xla_flops", "optimal_seconds", "tokens_per_s_per_chip",
           "useful_tokens_per_s_per_chip", "projected_mfu", "projected_mfu_slots", "compile_s", "cost_compile_s")


def levers_for(study: str) -> list[str]:
  """The levers that apply to `study`, in LEVERS's order."""
  return [name for name in LEVERS if name not in MOE_LEVERS or study in MOE_STUDIES]


def compile_lever(study: str, lever: str, cost: bool = True, python: str = sys.executable,
                  env: dict | None = None) -> dict:
  """mm1-aot's report for one lever of a study, compiled by `python` (benchmarks/peer_maxtext.py
  passes another environment's interpreter)."""
  if lever not in levers_for(study):
    raise SystemExit(f"lever {lever!r} binds the MoE layer; study {study!r} has a dense decoder")
  (gin_file, *more_files), bindings = STUDIES[study]
  args = ([f"--gin_file={f}" for f in more_files] + [f"--gin.{b}" for b in bindings + LEVERS[lever]]
          + ([] if cost else ["--no_cost"]))
  OUT.mkdir(parents=True, exist_ok=True)
  report = preflight.aot_report(gin_file, args, OUT, python=python, env=env)
  report["bindings"] = bindings + LEVERS[lever]
  return report


def ratios(r: dict, base: dict) -> dict:
  """Projected throughput and per-chip memory of report `r` over `base`'s, where both have them."""
  row = {}
  if r.get("tokens_per_s_per_chip") and base.get("tokens_per_s_per_chip"):
    row["tokens_per_s_ratio"] = round(r["tokens_per_s_per_chip"] / base["tokens_per_s_per_chip"], 3)
  if r.get("per_chip_bytes") and base.get("per_chip_bytes"):
    row["memory_ratio"] = round(r["per_chip_bytes"] / base["per_chip_bytes"], 3)
  return row


def compare(levers: dict[str, dict]) -> dict:
  """Each lever's projected throughput and per-chip memory over the first lever's."""
  (base_name, base), *_ = levers.items()
  return {name: {"against": base_name, **ratios(r, base)} for name, r in levers.items()}


def table(folder: Path = OUT) -> str:
  rows = []
  for f in sorted(folder.glob("*.json")):
    rec = json.loads(f.read_text())
    figs = rec["figures"]
    rows += [f"**{figs['study']}** (record `results/tpu_levers/{f.name}`, {record.short_commit(rec)})", "",
             "| lever | per-chip memory | step (roofline) | tokens/s per chip | useful-FLOP MFU | vs first |",
             "|---|---|---|---|---|---|"]
    for name, r in figs["levers"].items():
      mem = "-" if r.get("per_chip_bytes") is None else f"{r['per_chip_bytes'] / 2**30:.2f} GiB"
      step = "-" if r.get("optimal_seconds") is None else f"{r['optimal_seconds']:.3f} s"
      tps = "-" if r.get("tokens_per_s_per_chip") is None else f"{r['tokens_per_s_per_chip']:,.0f}"
      mfu = "-" if r.get("projected_mfu") is None else f"{r['projected_mfu']:.1%}"
      ratio = figs["against_first"][name].get("tokens_per_s_ratio")
      rows.append(f"| {name} | {mem} | {step} | {tps} | {mfu} | {'-' if ratio is None else f'{ratio:.3f}x'} |")
    rows.append("")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--study", choices=sorted(STUDIES), default="mm1_7b_text_v5p-64")
  p.add_argument("--lever", action="append", choices=sorted(LEVERS), default=[],
                 help="repeatable; the first is the one the others are compared with (default: all that apply "
                      "to the study, base first)")
  p.add_argument("--no_cost", action="store_true", help="memory only: skip the costing compiles")
  p.add_argument("--table", action="store_true", help="print the tables of the saved records only")
  p.add_argument("--record", default=None,
                 help="record name under results/tpu_levers/ (default: the study's name)")
  args = p.parse_args(argv)
  if args.table:
    print(table())
    return 0
  OUT.mkdir(parents=True, exist_ok=True)
  git = record.git_state()  # the code the compiles load
  levers = {}
  names = args.lever or levers_for(args.study)
  for name in tqdm(names, desc=f"{args.study}: levers", unit="lever", file=sys.stderr):
    r = compile_lever(args.study, name, cost=not args.no_cost)
    levers[name] = r
    print(json.dumps({"lever": name, **{k: r.get(k) for k in SUMMARY}}), flush=True)
  gin_files, bindings = STUDIES[args.study]
  figures = {"study": args.study, "gin_files": gin_files, "bindings": bindings, "levers": levers,
             "against_first": compare(levers)}
  record.write(OUT / f"{args.record or args.study}.json", "tpu_levers", figures, git=git)
  print(table())
  return 0


if __name__ == "__main__":
  sys.exit(main())
