"""Does the quickstart model tell the shapes apart? VQA per answer type, and its trunk probed.

  python -m benchmarks.quickstart_shapes                   # three quickstarts, about 40 minutes on 2 cores
  python -m benchmarks.quickstart_shapes --seeds=3         # with seed-to-seed standard errors
  python -m benchmarks.quickstart_shapes --sweep=gin/ablations/encoder_lr.sweep \
      --json_out=benchmarks/results/quickstart_shapes/encoder_lr_cpu_2core.json
  python -m benchmarks.quickstart_shapes --sweep= --gin_file=gin/encoders/aim_tiny.gin \
      --grid='init/train.train.init_from={"aim": ["/tmp/aim/checkpoints:encoder"], "scratch": []}' \
      --json_out=...   # a hand-over (the quickstart trains the encoder at a tenth of the rate)
  python -m benchmarks.quickstart_shapes --sweep= --encoder=/tmp/qs_encoder --seeds=2 \
      --grid='init/ENCODER_INIT={"supervised": ["/tmp/qs_encoder:encoder"], "scratch": []}' --json_out=...
      # the quickstart as the README runs it (mm1-supervised first) beside the same model from scratch

1. `mm1-sweep` over gin/ablations/trunk.sweep (or --sweep) on gin/experiments/quickstart.gin
   (learned positions, sin-cos positions as shipped, a conv stem with sin-cos positions), each run evaluated at its
   last step on all 512 held-out VQA questions, zero-shot and 4-shot.
2. `mm1-probe` of each run's trunk (frozen features, the leftmost shape's kind and colour, the
   count) beside the trunk as the model initialises it (`--baseline`; a run's own start unless
   it began from `init_from`): whether the pre-training put shape into the encoder at all,
   whatever the decoder makes of it. A run's existing probe.json is reused; delete it to
   probe again.

Per variant and answer type the record holds the accuracy, its standard error over the
questions (binomial, sqrt(p (1 - p) / n): the evaluation sample's share of the noise only) and,
with --seeds > 1, the mean and standard error over seeds; beside them the blind guess (the most
frequent answer of each type). Writes benchmarks/results/quickstart_shapes/cpu_2core.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks import record
from benchmarks.jobs import REPO, record_header, run_logged, supervised_encoder, write_record
from benchmarks.sft_vqa import _blind_guess
from mm1_jax.eval import report

OUT = REPO / "benchmarks" / "results" / "quickstart_shapes" / "cpu_2core.json"
SWEEP = "gin/ablations/trunk.sweep"
TYPES = ("shape", "colour", "number")


def _final_eval(run: Path) -> dict:
  """The scores of the run's newest evaluation."""
  if not (found := report.load_results(run / "eval")):
    raise SystemExit(f"{run} has no evaluation (eval/step_<N>.json); see its sweep_log.txt")
  return found[max(found)]


def _per_type(results: dict, blind: dict, shots: int) -> dict:
  out = {}
  for t in TYPES:
    p = results[f"shapes_vqa/{shots}shot/accuracy/{t}"]
    n = blind[t]["questions"]
    out[t] = {"accuracy": round(p, 4), "se_over_questions": round(math.sqrt(p * (1 - p) / n), 4),
              "questions": n, "blind_guess": blind[t]["its_share"]}
  return out


def _over_seeds(values: list[float]) -> dict:
  out = {"n": len(values), "mean": round(statistics.fmean(values), 4)}
  if len(values) > 1:
    out["se"] = round(statistics.stdev(values) / math.sqrt(len(values)), 4)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="/tmp/mm1_quickstart_shapes", help="the sweep's folder (runs are kept)")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--sweep", default=SWEEP, help="the sweep file of the variants ('' for none: --grid only)")
  p.add_argument("--grid", default=None, help="mm1-sweep --grid: axes on the command line")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin files every run reads after gin/experiments/quickstart.gin (repeatable)")
  p.add_argument("--encoder", default=None, metavar="DIR",
                 help="first train the quickstart's encoder on labelled scenes (mm1-supervised --out=DIR, with the "
                      "--gin_file and --gin. bindings; reused when there) and keep its result in the record; "
                      "--grid or --gin.ENCODER_INIT must hand it to runs ('DIR:encoder')")
  p.add_argument("--json_out", default=str(OUT))
  args, bindings = p.parse_known_args(argv)
  if bad := [b for b in bindings if not b.startswith("--gin.")]:
    p.error(f"unrecognised arguments: {' '.join(bad)} (only --gin.NAME=VALUE bindings pass to every run)")
  if args.encoder and "ENCODER_INIT" not in " ".join([args.grid or "", *bindings]):
    p.error("--encoder trains a trunk that no run would take: name it in --grid (an ENCODER_INIT axis) "
            "or in --gin.ENCODER_INIT")
  py, root = sys.executable, Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  git = record.git_state()
  encoder = None
  if args.encoder:
    encoder = supervised_encoder(py, Path(args.encoder), root / "supervised_output.txt", args.gin_file, bindings)
  sweep_cmd = [py, "-m", "mm1_jax", "sweep", "--gin_file=gin/experiments/quickstart.gin",
               *(f"--gin_file={f}" for f in args.gin_file), *([f"--sweep={args.sweep}"] if args.sweep else []),
               *([f"--grid={args.grid}"] if args.grid else []),
               f"--seeds={args.seeds}", f"--root={root}", "--gin.fewshot.FewShotConfig.benchmarks=('shapes_vqa',)",
               "--gin.fewshot.FewShotConfig.shots=(0, 4)", "--gin.fewshot.FewShotConfig.num_queries=None",
               "--gin.train.train.eval_at_start=False", "--gin.train.train.progress=False", *bindings]
  wall = run_logged(sweep_cmd, root / "sweep_output.txt")
  plan = json.loads((root / "sweep.json").read_text())
  blind = _blind_guess()
  variants: dict[str, dict] = {}
  for run in plan["runs"]:
    workdir = Path(run["workdir"])
    results = _final_eval(workdir)
    probe_json = workdir / "probe.json"
    if not probe_json.exists():
      run_logged([py, "-m", "mm1_jax", "probe", f"--gin_file={workdir / 'config.gin'}",
                  f"--init_from={workdir / 'checkpoints'}", "--baseline", "--no_progress",
                  f"--json_out={probe_json}"], workdir / "probe_output.txt")
    v = variants.setdefault(run["cell"], {"runs": []})
    v["runs"].append({"seed": run["seed"], "seconds": run.get("seconds"),
                      "vqa_0shot": _per_type(results, blind, 0), "vqa_4shot": _per_type(results, blind, 4),
                      "probe": json.loads(probe_json.read_text())})
  for v in variants.values():
    for shots in ("vqa_0shot", "vqa_4shot"):
      v[f"{shots}_over_seeds"] = {t: _over_seeds([r[shots][t]["accuracy"] for r in v["runs"]]) for t in TYPES}
  result = {**record_header(), "command": " ".join(sweep_cmd[1:]), "sweep_wall_s": wall, "blind_guess": blind,
            **({"encoder": encoder} if encoder else {}), "variants": variants}
  write_record(Path(args.json_out), result, git=git, benchmark="quickstart_shapes")
  for name, v in variants.items():
    print(name, json.dumps(v["vqa_0shot_over_seeds"]), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
