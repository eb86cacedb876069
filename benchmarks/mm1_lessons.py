"""Do MM1's lessons hold at the quickstart? Two sweeps, recorded with standard errors.

  python -m benchmarks.mm1_lessons                    # data and connector: 6 levels x 2 seeds
  python -m benchmarks.mm1_lessons --study=encoder    # encoder objective: 4 encoders, then 5 levels x 2 seeds
  python -m benchmarks.mm1_lessons --seeds=3 --root=/tmp/mm1_lessons3

Study "lessons" (gin/ablations/mm1_lessons.sweep; each level against "base", the quickstart):
1. `mm1-supervised` trains the quickstart's encoder (as the README's first command does; reused
   when <root>/encoder already holds it); every level starts from it.
Study "encoder" (gin/ablations/encoder_objective.sweep; each level against "none", no encoder):
1. The four encoders, compute-matched by images seen (19,200 each), into /tmp/mm1_encoders,
   where the sweep file names them: `mm1-supervised --steps=300` (300 x 64 labelled scenes),
   the shipped AIM and AIMv2 experiments (600 x 32 captioned images) and the contrastive one
   (300 x 64); a finished one is kept. Each is probed (`mm1-probe --baseline`).
Both:
2. `mm1-sweep` runs every level of the sweep file, each for the quickstart's
   600 steps, and evaluates the final step on every test question of the bundled benchmarks:
   captioning (CIDEr) and VQA, zero- and 4-shot, and the text-only ones (held-out text
   perplexity, text questions). A rerun resumes the sweep (runs already done are kept).
3. The record: per level and metric the mean and the standard error over seeds; per level its
   difference from "base" with two standard errors of that difference, one from the spread
   over seeds (sqrt(se_a^2 + se_b^2), from few seeds, so itself rough) and, for accuracies,
   one from the questions alone (binomial, p (1 - p) / n per level with n the questions: the
   seeds answer the same questions, so more seeds do not shrink it); `in_se` divides by the
   larger of the two. CIDEr and perplexity get the
   seed-based one only. The sweep's table and plots are copied beside the record.

Which level tests which lesson is the sweep files' comment (docs/ablations.md); the record
holds the numbers only. Writes benchmarks/results/mm1_lessons/<study>_cpu_2core.json (+
<study>_table.md, <study>_plots/).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from benchmarks import record
from benchmarks.jobs import REPO, answers_by_type, record_header, run_logged, supervised_encoder, write_record

RESULTS = REPO / "benchmarks" / "results" / "mm1_lessons"
# study: (sweep file, the level every other is compared with, default root)
STUDIES = {"lessons": ("gin/ablations/mm1_lessons.sweep", "lesson-base", "/tmp/mm1_lessons"),
           "encoder": ("gin/ablations/encoder_objective.sweep", "encoder-none", "/tmp/mm1_encoder_objective")}
ENCODERS = Path("/tmp/mm1_encoders")  # where gin/ablations/encoder_objective.sweep finds them
IMAGES_SEEN = 19_200
# objective: (experiment, batch); steps = IMAGES_SEEN / batch
ENCODER_RUNS = {"contrastive": ("gin/experiments/contrastive_pretrain.gin", 64),
                "aim": ("gin/experiments/aim_pretrain.gin", 32), "aimv2": ("gin/experiments/aimv2_pretrain.gin", 32)}
SUPERVISED_BATCH = 64
BENCHMARKS = ("shapes_caption", "shapes_vqa", "shapes_text_ppl", "shapes_textqa")
# Scored metrics of the record, its table and its plots (the final step's eval).
METRICS = (
    *(f"shapes_vqa/{k}shot/accuracy{t}" for k in (0, 4) for t in ("", "/shape", "/colour", "/number")),
    *(f"shapes_caption/{k}shot/cider" for k in (0, 4)),
    "shapes_text_ppl/0shot/nll",
    *(f"shapes_textqa/{k}shot/exact_match{t}" for k in (0, 4) for t in ("", "/corners", "/group")),
    "train/loss",
)
# The test split behind each accuracy, and the field that names a question's type.
SPLITS = {"shapes_vqa": "mm1_shapes_vqa_eval", "shapes_textqa": "mm1_shapes_textqa_eval"}


def question_counts() -> dict[str, dict[str, int]]:
  """Test questions per benchmark: {"all": n, <answer_type>: n, ...}."""
  out = {}
  for bench, task in SPLITS.items():
    per_type = {t: sum(c.values()) for t, c in answers_by_type(task).items()}
    out[bench] = {"all": sum(per_type.values()), **per_type}
  return out


def _questions(metric: str, counts: dict) -> int | None:
  """The questions behind an accuracy metric (<bench>/<k>shot/<accuracy|exact_match>[/type]), else None."""
  parts = metric.split("/")
  if len(parts) < 3 or parts[0] not in counts or parts[2] not in ("accuracy", "exact_match"):
    return None  # train/loss, CIDEr, perplexity
  bench, _, _, *kind = parts
  return counts[bench].get(kind[0] if kind else "all")


def train_encoders(py: str, folder: Path) -> dict:
  """The encoder study's four encoders (kept when finished), each with its probe."""
  out = {"images_seen": IMAGES_SEEN}
  steps = IMAGES_SEEN // SUPERVISED_BATCH
  enc = supervised_encoder(py, folder / "supervised", folder / "supervised_output.txt",
                           bindings=[f"--steps={steps}", f"--batch_size={SUPERVISED_BATCH}"])
  out["supervised"] = {"steps": steps, "batch_size": SUPERVISED_BATCH, "result": enc}
  probes = {"supervised": ("gin/experiments/quickstart.gin", folder / "supervised")}
  for name, (gin_file, batch) in ENCODER_RUNS.items():
    run, steps = folder / name, IMAGES_SEEN // batch
    cmd = [py, "-m", "mm1_jax", "train", f"--gin_file={gin_file}", f"--workdir={run}", f"--gin.BATCH_SIZE={batch}",
           f"--gin.TRAIN_STEPS={steps}", f"--gin.CHECKPOINT_EVERY={steps}", "--gin.train.train.progress=False"]
    wall = None if (run / "train_done.json").exists() else run_logged(cmd, folder / f"{name}_output.txt")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    if last["step"] != steps:
      raise SystemExit(f"{run} ran {last['step']} steps, not {steps}: the encoders would not be compute-matched; "
                       "delete it to train it again")
    out[name] = {"command": " ".join(cmd[1:]), "steps": steps, "batch_size": batch, "wall_s": wall,
                 "last_step": last["step"], "last_loss": last["loss"]}
    probes[name] = (gin_file, run / "checkpoints")
  for name, (gin_file, init) in probes.items():
    probe = folder / f"{name}_probe.json"
    if not probe.exists():
      run_logged([py, "-m", "mm1_jax", "probe", f"--gin_file={gin_file}", f"--init_from={init}", "--baseline",
                  "--no_progress", f"--json_out={probe}"], folder / f"{name}_probe_output.txt")
    out[name]["probe"] = json.loads(probe.read_text())
  return out


def contrasts(table: dict, counts: dict, base: str) -> dict:
  """Each level against `base`, per metric: difference, its standard errors, and in_se."""
  cells = {c["cell"]: c["stats"] for c in table["cells"]}
  if base not in cells:
    raise SystemExit(f"the sweep has no {base!r} cell: its levels are {sorted(cells)}")
  out = {}
  for name, stats in cells.items():
    if name == base:
      continue
    per = {}
    for metric, s in stats.items():
      b = cells[base][metric]
      if not s["n"] or not b["n"]:
        continue
      diff = s["mean"] - b["mean"]
      entry = {"difference": round(diff, 4)}
      if s["se"] is not None and b["se"] is not None:
        entry["se_over_seeds"] = round(math.sqrt(s["se"] ** 2 + b["se"] ** 2), 4)
      n = _questions(metric, counts)
      if n:
        entry["se_over_questions"] = round(math.sqrt(sum(p * (1 - p) / n for p in (s["mean"], b["mean"]))), 4)
      se = max(entry.get("se_over_seeds", 0.0), entry.get("se_over_questions", 0.0))
      entry["in_se"] = round(diff / se, 2) if se else None
      per[metric] = entry
    out[name] = per
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--study", choices=sorted(STUDIES), default="lessons")
  p.add_argument("--root", default=None, help="the study's folder (runs and the encoder are kept; default per study)")
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--json_out", default=None, help="default: benchmarks/results/mm1_lessons/<study>_cpu_2core.json")
  args = p.parse_args(argv)
  sweep_file, base, default_root = STUDIES[args.study]
  py, root = sys.executable, Path(args.root or default_root)
  root.mkdir(parents=True, exist_ok=True)
  git = record.git_state()
  if args.study == "lessons":
    encoder = {"supervised": supervised_encoder(py, root / "encoder", root / "supervised_output.txt")}
    init = [f"--gin.ENCODER_INIT=['{root / 'encoder'}:encoder']"]
  else:
    encoder, init = train_encoders(py, ENCODERS), []  # each level names its encoder
  sweep_cmd = [py, "-m", "mm1_jax", "sweep", "--gin_file=gin/experiments/quickstart.gin", f"--sweep={sweep_file}",
               f"--seeds={args.seeds}", f"--root={root}", f"--metrics={','.join(METRICS)}", *init,
               f"--gin.fewshot.FewShotConfig.benchmarks={BENCHMARKS!r}",
               "--gin.fewshot.FewShotConfig.shots=(0, 4)", "--gin.fewshot.FewShotConfig.num_queries=None",
               "--gin.train.train.eval_at_start=False", "--gin.train.train.progress=False", "--no_progress"]
  wall = run_logged(sweep_cmd, root / "sweep_output.txt")
  table = json.loads((root / "table.json").read_text())
  plan = json.loads((root / "sweep.json").read_text())
  counts = question_counts()
  cells = {c["cell"]: {m: {k: s[k] for k in ("n", "mean", "se", "values")} for m, s in c["stats"].items()}
           for c in table["cells"]}
  result = {**record_header(), "study": args.study, "command": " ".join(sweep_cmd[1:]), "sweep_wall_s": wall,
            "encoders": encoder, "test_questions": counts,
            "run_seconds": {f"{r['cell']}/seed{r['seed']}": r.get("seconds") for r in plan["runs"]},
            # the git commit of each attempt of each run (a sweep resumed later, at other code, shows it)
            "run_code_versions": {f"{r['cell']}/seed{r['seed']}": r.get("code_versions") for r in plan["runs"]},
            "cells": cells, "base": base, "against_base": contrasts(table, counts, base)}
  out = Path(args.json_out) if args.json_out else RESULTS / f"{args.study}_cpu_2core.json"
  write_record(out, result, git=git, benchmark="mm1_lessons")
  shutil.copyfile(root / "table.md", out.with_name(f"{args.study}_table.md"))
  plots = out.with_name(f"{args.study}_plots")
  if plots.exists():
    shutil.rmtree(plots)
  shutil.copytree(root / "plots", plots)
  for name, per in result["against_base"].items():
    print(name, json.dumps({m: e["in_se"] for m, e in per.items()}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
