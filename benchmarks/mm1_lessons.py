"""Do MM1's lessons hold at the quickstart? gin/ablations/mm1_lessons.sweep, recorded with standard errors.

  python -m benchmarks.mm1_lessons                    # 6 levels x 2 seeds, about 80 minutes on 2 cores
  python -m benchmarks.mm1_lessons --seeds=3 --root=/tmp/mm1_lessons3

1. `mm1-supervised` trains the quickstart's encoder (as the README's first command does; reused
   when <root>/encoder already holds it).
2. `mm1-sweep` runs every level of the sweep file from that encoder, each for the quickstart's
   600 steps, and evaluates the final step on every test question of the bundled benchmarks:
   captioning (CIDEr) and VQA, zero- and 4-shot, and the text-only ones (held-out text
   perplexity, text questions). A rerun resumes the sweep (runs already done are kept).
3. The record: per level and metric the mean and the standard error over seeds; per level its
   difference from "base" with two standard errors of that difference, one from the spread
   over seeds (sqrt(se_a^2 + se_b^2), from few seeds, so itself rough) and, for accuracies,
   one from the questions alone (binomial, sqrt(p (1 - p) / n) per level, n = seeds x
   questions); `in_se` divides by the larger of the two. CIDEr and perplexity get the
   seed-based one only. The sweep's table and plots are copied beside the record.

Which level tests which lesson is the sweep file's comment and docs/results.md; the record
holds the numbers only. Writes benchmarks/results/mm1_lessons/cpu_2core.json (+ table.md, plots/).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import sys
from pathlib import Path

from benchmarks import record
from benchmarks.jobs import REPO, record_header, run_logged, supervised_encoder, write_record

OUT = REPO / "benchmarks" / "results" / "mm1_lessons" / "cpu_2core.json"
SWEEP = "gin/ablations/mm1_lessons.sweep"
BASE = "lesson-base"
BENCHMARKS = ("shapes_caption", "shapes_vqa", "shapes_text_ppl", "shapes_textqa")
# Scored metrics of the record, its table and its plots (the final step's eval).
METRICS = (
    *(f"shapes_vqa/{k}shot/accuracy{t}" for k in (0, 4) for t in ("", "/shape", "/colour", "/number")),
    *(f"shapes_caption/{k}shot/cider" for k in (0, 4)),
    "shapes_text_ppl/0shot/nll",
    *(f"shapes_textqa/{k}shot/exact_match{t}" for k in (0, 4) for t in ("", "/corners")),
    "train/loss",
)
# The test split behind each accuracy, and the field that names a question's type.
SPLITS = {"shapes_vqa": "mm1_shapes_vqa_eval", "shapes_textqa": "mm1_shapes_textqa_eval"}


def question_counts() -> dict[str, dict[str, int]]:
  """Test questions per benchmark: {"all": n, <answer_type>: n, ...}."""
  import tasks  # noqa: F401, PLC0415  (registers the shapes-world seqio tasks)
  from mm1_jax.eval import fewshot  # noqa: PLC0415

  out = {}
  for bench, task in SPLITS.items():
    test = fewshot.load_split(task, "test")
    out[bench] = {"all": len(test), **collections.Counter(q["answer_type"] for q in test)}
  return out


def _questions(metric: str, counts: dict) -> int | None:
  """The questions behind an accuracy metric (<bench>/<k>shot/<accuracy|exact_match>[/type]), else None."""
  bench, _, score, *kind = metric.split("/")
  if bench not in counts or score not in ("accuracy", "exact_match"):
    return None
  return counts[bench].get(kind[0] if kind else "all")


def contrasts(table: dict, counts: dict, base: str = BASE) -> dict:
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
        entry["se_over_questions"] = round(math.sqrt(sum(
            p * (1 - p) / (n * k) for p, k in ((s["mean"], s["n"]), (b["mean"], b["n"])))), 4)
      se = max(entry.get("se_over_seeds", 0.0), entry.get("se_over_questions", 0.0))
      entry["in_se"] = round(diff / se, 2) if se else None
      per[metric] = entry
    out[name] = per
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="/tmp/mm1_lessons", help="the study's folder (runs and the encoder are kept)")
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--sweep", default=SWEEP, help="the sweep file; it must have a 'base' level on axis 'lesson'")
  p.add_argument("--json_out", default=str(OUT))
  args = p.parse_args(argv)
  py, root = sys.executable, Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  git = record.git_state()
  encoder = supervised_encoder(py, root / "encoder", root / "supervised_output.txt")
  sweep_cmd = [py, "-m", "mm1_jax", "sweep", "--gin_file=gin/experiments/quickstart.gin", f"--sweep={args.sweep}",
               f"--seeds={args.seeds}", f"--root={root}", f"--metrics={','.join(METRICS)}",
               f"--gin.ENCODER_INIT=['{root / 'encoder'}:encoder']",
               f"--gin.fewshot.FewShotConfig.benchmarks={BENCHMARKS!r}",
               "--gin.fewshot.FewShotConfig.shots=(0, 4)", "--gin.fewshot.FewShotConfig.num_queries=None",
               "--gin.train.train.eval_at_start=False", "--gin.train.train.progress=False", "--no_progress"]
  wall = run_logged(sweep_cmd, root / "sweep_output.txt")
  table = json.loads((root / "table.json").read_text())
  plan = json.loads((root / "sweep.json").read_text())
  counts = question_counts()
  cells = {c["cell"]: {m: {k: s[k] for k in ("n", "mean", "se", "values")} for m, s in c["stats"].items()}
           for c in table["cells"]}
  result = {**record_header(), "command": " ".join(sweep_cmd[1:]), "sweep_wall_s": wall,
            "encoder": encoder, "test_questions": counts,
            "run_seconds": {f"{r['cell']}/seed{r['seed']}": r.get("seconds") for r in plan["runs"]},
            "cells": cells, "against_base": contrasts(table, counts)}
  out = Path(args.json_out)
  write_record(out, result, git=git, benchmark="mm1_lessons")
  shutil.copyfile(root / "table.md", out.with_name("table.md"))
  if (out.parent / "plots").exists():
    shutil.rmtree(out.parent / "plots")
  shutil.copytree(root / "plots", out.parent / "plots")
  for name, per in result["against_base"].items():
    print(name, json.dumps({m: e["in_se"] for m, e in per.items()}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
