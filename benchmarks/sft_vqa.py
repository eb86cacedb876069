"""Does supervised fine-tuning raise VQA accuracy on the bundled data? Measured per answer type.

  python -m benchmarks.sft_vqa                      # every default run, from nothing (each record holds its times)
  python -m benchmarks.sft_vqa --sft_runs=sft --pretrain_seed=1   # SFT as shipped, from the seed-1 quickstart
  python -m benchmarks.sft_vqa --pretrain_steps=3000 --sft_runs=sft_300
  python -m benchmarks.sft_vqa --sft_runs=detail_300,detail_highres_300 \
      --json_out=benchmarks/results/sft_vqa/detail_pretrain600_cpu.json   # the high-resolution test
  python -m benchmarks.sft_vqa --pretrained=/tmp/mm1_lessons/lesson-base/seed0 --encoder=/tmp/mm1_lessons/encoder ...
      # fine-tunes a finished quickstart run instead of pre-training one
  python -m benchmarks.sft_vqa --encoder_labels=leftmost --sft_runs=sft_300
      # the encoder taught the leftmost shape only (mm1-supervised --labels=leftmost)
  python -m benchmarks.sft_vqa --encoder_labels=patches --sft_runs=sft --pretrain_seed=2
      # the encoder also taught each patch's shape (mm1-supervised --labels=patches)
  python -m benchmarks.sft_vqa --sft_runs=sft --pretrain_seed=2 --binding=connector.CAbstractorConfig.num_tokens=64 \
      --binding=SEQ_LEN=320 --workdir=/tmp/mm1_sft_vqa_64
      # --binding: gin bindings for the pre-training, fine-tuning and evaluations (not the encoder): another model
  python -m benchmarks.sft_vqa --sft_runs=sft --pretrain_seed=2 --encoder_steps=3600
      # the encoder trained three times as long (mm1-supervised --steps=3600); its folder and runs say so

1. Pre-training: the quickstart as the README runs it: `mm1-supervised` trains the encoder on
   labelled scenes (into --encoder, reused when it is there), then gin/experiments/quickstart.gin
   from it (--pretrain_steps overrides its 600 steps). The fine-tuned runs are named after it
   (sft_from_pretrain_600_supervised_every_shape, ...).
2. Fine-tuning from its last checkpoint: gin/experiments/sft.gin as shipped (1,000 steps, the
   encoder at a tenth of the rate), the same for 300 steps (sft_300), the same with the encoder at
   the full rate (sft_encoder_full_lr), and gin/experiments/sft_highres.gin (overview + 2x2
   sub-images) for 600 steps. Only when --sft_runs names them: the same for 2,000 steps
   (sft_2000), with the encoder frozen (sft_encoder_frozen), with SFT's own seed set to 1 (sft_seed1:
   its data order) or at a lower peak learning rate (sft_lr3e-4, sft_lr1e-4), and the high-resolution test:
   both files for 300 steps on the detail corpus (gin/experiments/sft_detail.gin,
   sft_highres_detail.gin: 128 px scenes whose shapes a 64 px overview halves),
   detail_highres_300 also compared with detail_300 (the sub-images' own effect).
3. `mm1-eval` of every final checkpoint on the whole held-out VQA split (512 questions; the
   detail corpus's for the detail runs), zero-shot, with accuracy per answer type (number,
   colour, shape): the pre-trained model in its pre-training format (on each split a chosen
   run is scored on), the fine-tuned ones in the chat format. The share of the
   most frequent answer of each type is recorded beside them (what a blind guess scores), and
   per answer type the change of each fine-tuned model over the pre-trained one in standard
   errors of the difference (binomial over the questions, the two models' errors taken as
   independent).

Writes benchmarks/results/sft_vqa_pretrain<steps>_cpu.json (or --json_out; with the machine it ran on). Runs are kept
under --workdir; a finished run is not trained again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks import record
from benchmarks.jobs import (REPO, answers_by_type, newest_eval, record_header, run_logged, supervised_encoder,
                             write_record)

RESULTS = REPO / "benchmarks" / "results"

SFT_RUNS = {  # name: gin flags after --gin.INIT_FROM
    "sft": ["--gin_file=gin/experiments/sft.gin"],  # as shipped: 1,000 steps, the encoder at a tenth of the rate
    "sft_300": ["--gin_file=gin/experiments/sft.gin", "--gin.TRAIN_STEPS=300", "--gin.EVAL_EVERY=100",
                "--gin.CHECKPOINT_EVERY=100"],
    "sft_encoder_full_lr": ["--gin_file=gin/experiments/sft.gin", "--gin.optim.OptimizerConfig.lr_multipliers=None"],
    "sft_2000": ["--gin_file=gin/experiments/sft.gin", "--gin.TRAIN_STEPS=2000", "--gin.EVAL_EVERY=500",
                 "--gin.CHECKPOINT_EVERY=500"],
    "sft_encoder_frozen": ["--gin_file=gin/experiments/sft.gin",
                           "--gin.optim.OptimizerConfig.lr_multipliers={'encoder': 0.0}"],
    # SFT's own seed (its data order; every parameter comes from the pre-trained run) set to 1.
    "sft_seed1": ["--gin_file=gin/experiments/sft.gin", "--gin.train.train.seed=1", "--gin.pipeline.DataConfig.seed=1"],
    # A lower peak learning rate (the shipped file's is 1e-3; the quickstart pre-trains at 2e-3).
    "sft_lr3e-4": ["--gin_file=gin/experiments/sft.gin", "--gin.PEAK_LR=3e-4"],
    "sft_lr1e-4": ["--gin_file=gin/experiments/sft.gin", "--gin.PEAK_LR=1e-4"],
    "sft_highres_600": ["--gin_file=gin/experiments/sft_highres.gin", "--gin.TRAIN_STEPS=600", "--gin.EVAL_EVERY=200",
                        "--gin.CHECKPOINT_EVERY=200", "--gin.train.train.eval_at_start=False"],
    # The high-resolution test: the same 300 steps on the detail corpus, the whole image at 64 px
    # against an overview and four 64 px crops of the 128 px image; scored by mm1-eval only.
    "detail_300": ["--gin_file=gin/experiments/sft_detail.gin", "--gin.EVALUATION=None"],
    "detail_highres_300": ["--gin_file=gin/experiments/sft_highres_detail.gin", "--gin.EVALUATION=None"],
}
# The detail runs are the high-resolution test's.
DEFAULT_RUNS = ("sft", "sft_300", "sft_encoder_full_lr", "sft_highres_600")
# The VQA benchmark and its seqio task, by world.
VQA = {"shapes": ("shapes_vqa", "mm1_shapes_vqa_eval"), "detail": ("shapes_vqa_detail", "mm1_shapes_vqa_detail_eval")}


def _world(flags: list[str]) -> str:
  return "detail" if any(f.startswith("--gin_file=") and f.endswith("_detail.gin") for f in flags) else "shapes"


def _key(world: str) -> str:
  """A run's scores in the record: vqa_0shot (the shapes world), vqa_detail_0shot."""
  return "vqa_0shot" if world == "shapes" else f"vqa_{world}_0shot"


def _train(cmd: list[str], run: Path, log: Path) -> dict:
  """A training run (kept if it finished before), its median step time and, when it ran here, its
  wall time (the command's, evaluations included)."""
  wall = None if (run / "train_done.json").exists() else run_logged(cmd, log)
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  times = [r["step_time_s"] for r in records if "step_time_s" in r]
  return {"steps": records[-1]["step"], "median_step_time_s": statistics.median(times) if times else None,
          "wall_s": wall}


def _evaluate(py: str, gin_files: list[str], run: Path, work: Path, name: str, world: str = "shapes",
              extra: tuple[str, ...] | list[str] = ()) -> dict:
  """Zero-shot VQA on all 512 held-out questions of the world's split, per answer type, from
  the newest checkpoint."""
  bench = VQA[world][0]
  out = work / f"eval_{name}" if world == "shapes" else work / f"eval_{name}_{world}"
  run_logged([py, "-m", "mm1_jax.cli", "eval", *(f"--gin_file={f}" for f in gin_files), f"--workdir={out}",
        f"--checkpoint_dir={run / 'checkpoints'}", "--no_run_config", f"--benchmarks={bench}",
        "--shots=0", "--num_queries=0", "--force", *extra], work / f"{out.name}.log")
  step_file = newest_eval(out)
  results = json.loads(step_file.read_text())["results"]
  return {k.removeprefix(f"{bench}/0shot/"): round(v, 4) for k, v in results.items()
          if "accuracy" in k}


def _blind_guess(world: str = "shapes") -> dict:
  """Share of the most frequent answer of each answer type, and over all questions when
  each type is answered with its own most frequent answer."""
  by_type = answers_by_type(VQA[world][1])
  total = sum(sum(c.values()) for c in by_type.values())
  out = {"questions": total,
         "overall_share": round(sum(c.most_common(1)[0][1] for c in by_type.values()) / total, 4)}
  for t, counts in sorted(by_type.items()):
    answer, n = counts.most_common(1)[0]
    out[t] = {"questions": sum(counts.values()), "most_frequent": answer,
              "its_share": round(n / sum(counts.values()), 4)}
  return out


def _change(before: dict, after: dict, blind: dict) -> dict:
  """Per answer type and over all questions ("all"): after - before, and that difference in
  standard errors of the difference (sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n), n the questions)."""
  out = {}
  for t in ("number", "colour", "shape", "all"):
    key, n = ("accuracy", blind["questions"]) if t == "all" else (f"accuracy/{t}", blind[t]["questions"])
    p1, p2 = before[key], after[key]
    se = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
    out[t] = {"difference": round(p2 - p1, 4), "se_of_difference": round(se, 4),
              "in_se": round((p2 - p1) / se, 2) if se else None}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/mm1_sft_vqa")
  p.add_argument("--pretrain_steps", type=int, default=600, help="quickstart steps before fine-tuning")
  p.add_argument("--sft_runs", default=",".join(DEFAULT_RUNS),
                 help=f"comma-separated, of {', '.join(SFT_RUNS)} (default {','.join(DEFAULT_RUNS)})")
  p.add_argument("--encoder", default=None, help="mm1-supervised's --out (default: <workdir>/encoder)")
  p.add_argument("--encoder_labels", default="every_shape", choices=("leftmost", "every_shape", "patches"),
                 help="mm1-supervised's --labels (default every_shape, as the README's quickstart)")
  p.add_argument("--encoder_steps", type=int, default=None,
                 help="mm1-supervised's --steps (default: its own, as the README's quickstart); when given, it names "
                      "the encoder's folder and the runs from it; with --pretrained, the steps of the encoder that "
                      "run started from")
  p.add_argument("--pretrained", default=None, metavar="RUN",
                 help="a finished quickstart run (e.g. a base run of benchmarks/mm1_lessons.py) to fine-tune instead "
                      "of pre-training one; its command is recorded from its operative config, and --encoder must "
                      "name the encoder it started from")
  p.add_argument("--pretrain_seed", type=int, default=0,
                 help="the pre-training's seed (train.train.seed and pipeline.DataConfig.seed, as mm1-sweep sets "
                      "them); not 0: the run's folder says it")
  p.add_argument("--binding", action="append", default=[], metavar="NAME=VALUE",
                 help="a gin binding for the pre-training, every SFT run and every evaluation here, not the "
                      "supervised encoder (repeatable), e.g. connector.CAbstractorConfig.num_tokens=64; the runs' "
                      "folders are named after them; not with --pretrained")
  p.add_argument("--json_out", default=None, help="the record (default: results/sft_vqa_pretrain<steps>_cpu.json)")
  args = p.parse_args(argv)
  chosen = [n.strip() for n in args.sft_runs.split(",") if n.strip()]
  if args.encoder_steps is not None and args.encoder_steps < 1:
    p.error("--encoder_steps must be positive")
  if args.binding and args.pretrained:  # its checkpoint may not fit the bindings, and a wrong fit can load silently
    p.error("--binding applies to a run trained here; with --pretrained, name a run trained with those bindings "
            "and leave --binding out")
  if unknown := sorted(set(chosen) - set(SFT_RUNS)):
    p.error(f"unknown --sft_runs {unknown}; known: {', '.join(SFT_RUNS)}")
  work = Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  py = sys.executable
  git = record.git_state()  # the code this run loads
  worlds = sorted({_world(SFT_RUNS[n]) for n in chosen} or {"shapes"}, reverse=True)  # "shapes" first
  blind = {w: _blind_guess(w) for w in worlds}
  result = {**record_header(), "bindings": args.binding, "blind_guess": blind["shapes"] if "shapes" in blind else None,
            **({"blind_guess_detail": blind["detail"]} if "detail" in blind else {}), "runs": {}}
  labels = "" if args.encoder_labels == "leftmost" else f"_{args.encoder_labels}"  # names the encoder and its runs
  encoder_flags = [f"--labels={args.encoder_labels}"]
  if args.encoder_steps is not None:
    labels += f"_steps{args.encoder_steps}"
    encoder_flags.append(f"--steps={args.encoder_steps}")
  encoder = Path(args.encoder) if args.encoder else work / f"encoder{labels}"
  result["encoder"] = supervised_encoder(py, encoder, work / f"encoder{labels}.log",
                                         bindings=encoder_flags)
  suffix = f"_seed{args.pretrain_seed}" if args.pretrain_seed else ""  # names the pre-trained run
  if args.binding:  # another model or data: its own folders
    suffix += "_bindings_" + hashlib.sha1("\n".join(args.binding).encode()).hexdigest()[:8]
  extra = [f"--gin.{b}" for b in args.binding]
  # From the supervised encoder, as the README runs it.
  pre = work / f"pretrain_{args.pretrain_steps}_supervised{labels}{suffix}"
  if args.pretrained:
    pre = Path(args.pretrained)
    if not (pre / "train_done.json").exists():
      p.error(f"--pretrained={pre} is not a finished run (no train_done.json)")
  if (pre / "operative_config.gin").exists() and f"{encoder}:encoder" not in (pre / "operative_config.gin").read_text():
    p.error(f"{pre} did not start from --encoder={encoder}" + ("" if args.pretrained else ": choose another --workdir"))
  label = f"{pre.parent.name}_{pre.name}" if args.pretrained else pre.name  # names its SFT runs and evaluations
  flags = ["--gin_file=gin/experiments/quickstart.gin", f"--gin.ENCODER_INIT=['{encoder}:encoder']"]
  if args.pretrain_seed:
    flags += [f"--gin.train.train.seed={args.pretrain_seed}", f"--gin.pipeline.DataConfig.seed={args.pretrain_seed}"]
  flags += extra
  if args.pretrain_steps != 600:  # a longer run: checkpoints every 500, all 512 questions every 1,000
    flags += [f"--gin.TRAIN_STEPS={args.pretrain_steps}", "--gin.EVAL_EVERY=1000", "--gin.CHECKPOINT_EVERY=500",
              "--gin.train.train.eval_at_start=False", "--gin.fewshot.FewShotConfig.shots=(0,)",
              "--gin.fewshot.FewShotConfig.num_queries=None"]
  result["runs"]["pretrained"] = {
      "command": f"reused {pre} (its config.gin)" if args.pretrained else "mm1-train " + " ".join(flags),
      **_train([py, "-m", "mm1_jax.cli", "train", *flags, f"--workdir={pre}", "--gin.train.train.progress=False"],
               pre, work / f"{label}.log"),
      **{_key(w): _evaluate(py, ["gin/experiments/quickstart.gin"], pre, work, label, w, extra)
         for w in worlds}}
  for name in chosen:
    flags, world = SFT_RUNS[name] + extra, _world(SFT_RUNS[name])
    run = work / f"{name}_from_{label}"
    cmd = [py, "-m", "mm1_jax.cli", "train", f"--workdir={run}", *flags,
           f"--gin.INIT_FROM='{pre / 'checkpoints'}'", "--gin.train.train.progress=False"]
    files = [f.split("=", 1)[1] for f in flags if f.startswith("--gin_file=")]
    result["runs"][name] = {"command": "mm1-train " + " ".join(flags), **_train(cmd, run, work / f"{run.name}.log"),
                            _key(world): _evaluate(py, files, run, work, run.name, world, extra)}
    result["runs"][name]["change_over_pretrained"] = _change(
        result["runs"]["pretrained"][_key(world)], result["runs"][name][_key(world)], blind[world])
    if name == "detail_highres_300" and "detail_300" in result["runs"]:
      result["runs"][name]["change_over_detail_300"] = _change(
          result["runs"]["detail_300"][_key(world)], result["runs"][name][_key(world)], blind[world])
    print(json.dumps(result["runs"][name]), flush=True)
  write_record(Path(args.json_out) if args.json_out else RESULTS / f"sft_vqa_pretrain{args.pretrain_steps}_cpu.json",
               result, git=git)
  return 0


if __name__ == "__main__":
  sys.exit(main())
