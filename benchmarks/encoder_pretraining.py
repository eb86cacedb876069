"""Image-encoder pre-training on the bundled data, judged the two ways that matter here.

  python -m benchmarks.encoder_pretraining                 # everything, about an hour on 2 cores
  python -m benchmarks.encoder_pretraining --skip_mm1      # pre-training and probes only
  python -m benchmarks.encoder_pretraining --objectives=aim,contrastive

1. Each objective's experiment as shipped: AIM (gin/experiments/aim_pretrain.gin), AIMv2
   (gin/experiments/aimv2_pretrain.gin) and, where its file exists, the contrastive
   objective (gin/experiments/contrastive_pretrain.gin): the losses at the first and last
   logged steps. `--objectives` picks some; the default is every one whose file exists.
2. `mm1-probe --baseline` on each trunk: attentive probes on frozen features for count,
   colour and shape, against the same probes on the trunk at random initialisation.
3. With AIMv2 among the objectives, MM1 quickstarts (gin/experiments/quickstart.gin with the
   AIMv2-tiny encoder, trained at the quickstart's tenth of the learning rate; records before
   that default trained it at the full rate) started from the AIMv2 trunk and from scratch: their few-shot
   evaluations at the end.

Writes the record benchmarks/results/encoder_pretraining/cpu_2core.json (with the machine it
ran on) and keeps every run under --workdir; running it again keeps the finished training
runs (and their wall times) and redoes the probes and the summary.

Smoke runs only: --train_steps and the --probe_* flags shrink the runs to check that the
benchmark works end to end. Their record goes to <workdir>/record.json unless --json_out
says otherwise, and it lists the overrides under "smoke_overrides".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.jobs import REPO, newest_eval, record_header, run_logged, write_record

OUT = REPO / "benchmarks" / "results" / "encoder_pretraining" / "cpu_2core.json"
OBJECTIVES = {"aim": "gin/experiments/aim_pretrain.gin", "aimv2": "gin/experiments/aimv2_pretrain.gin",
              "contrastive": "gin/experiments/contrastive_pretrain.gin"}


def _train(cmd: list[str], run: Path, log: Path) -> float:
  """A training run; one that finished before (train_done.json) is kept, with its wall time."""
  wall_file = run / "wall_s.txt"
  if (run / "train_done.json").exists() and wall_file.exists():
    print(f"kept the finished run {run}", flush=True)
    return float(wall_file.read_text())
  wall = run_logged(cmd, log)
  wall_file.write_text(str(wall))
  return wall


def _losses(workdir: Path) -> dict:
  """Every logged '*loss' metric at the first and the last logged step."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  first, last = records[0], records[-1]
  return {k: {"first_step": first["step"], "first": first[k], "last_step": last["step"], "last": last[k]}
          for k in first if k.endswith("loss") and k in last}


def _available() -> list[str]:
  return [name for name, gin_file in OBJECTIVES.items() if (REPO / gin_file).exists()]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/mm1_encoder_pretraining")
  p.add_argument("--objectives", default=None,
                 help=f"comma-separated, from {', '.join(OBJECTIVES)} (default: every one whose experiment "
                      "file exists)")
  p.add_argument("--skip_mm1", action="store_true", help="leave out the two MM1 quickstarts")
  p.add_argument("--json_out", default=None, help=f"the record's path (default: {OUT.relative_to(REPO)})")
  smoke = p.add_argument_group("smoke runs only (not for records that docs quote)")
  smoke.add_argument("--train_steps", type=int, default=None, help="steps of every training run")
  smoke.add_argument("--probe_steps", type=int, default=None, help="mm1-probe --steps")
  smoke.add_argument("--probe_num_train", type=int, default=None, help="mm1-probe --num_train")
  smoke.add_argument("--probe_num_test", type=int, default=None, help="mm1-probe --num_test")
  args = p.parse_args(argv)
  objectives = [o.strip() for o in args.objectives.split(",") if o.strip()] if args.objectives else _available()
  for o in objectives:
    if o not in OBJECTIVES:
      p.error(f"unknown objective {o}; choose from {', '.join(OBJECTIVES)}")
    if not (REPO / OBJECTIVES[o]).exists():
      p.error(f"objective {o}: {OBJECTIVES[o]} does not exist")
  if not objectives:
    p.error("no objective to run")
  work = Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  overrides = {k: v for k, v in (("train_steps", args.train_steps), ("probe_steps", args.probe_steps),
                                 ("probe_num_train", args.probe_num_train), ("probe_num_test", args.probe_num_test))
               if v is not None}
  out = Path(args.json_out) if args.json_out else (work / "record.json" if overrides else OUT)
  train_flags = []
  if args.train_steps is not None:
    n = args.train_steps
    train_flags = [f"--gin.TRAIN_STEPS={n}", f"--gin.WARMUP_STEPS={max(1, n // 10)}",
                   f"--gin.LOG_EVERY={max(1, n // 5)}", f"--gin.CHECKPOINT_EVERY={n}"]
  probe_flags = [f"--{k.removeprefix('probe_')}={v}" for k, v in overrides.items() if k.startswith("probe_")]
  py = sys.executable
  from benchmarks import record

  git = record.git_state()  # the code this run loads
  result = record_header()
  result["objectives"] = objectives
  if overrides:
    result["smoke_overrides"] = overrides
  for name in objectives:
    gin_file = OBJECTIVES[name]
    run = work / name
    wall = _train([py, "-m", "mm1_jax.cli", "train", f"--gin_file={gin_file}", f"--workdir={run}",
                   "--gin.train.train.progress=False", *train_flags], run, work / f"{name}_train.log")
    probe_json = work / f"{name}_probe.json"
    probe_wall = run_logged([py, "-m", "mm1_jax.probe", f"--gin_file={gin_file}", f"--init_from={run / 'checkpoints'}",
                             "--baseline", "--no_progress", *probe_flags, f"--json_out={probe_json}"],
                            work / f"{name}_probe.log")
    result[name] = {"gin_file": gin_file, "train_wall_s": wall, "losses": _losses(run),
                    "probe": json.loads(probe_json.read_text()), "probe_wall_s": probe_wall}
    print(json.dumps(result[name]["probe"]["tasks"], indent=1), flush=True)
  if not args.skip_mm1 and "aimv2" in objectives:
    result["mm1_quickstart_aimv2_encoder"] = {}
    for name, extra in (("from_aimv2", [f"--gin.train.init_from=['{work / 'aimv2' / 'checkpoints'}:encoder']"]),
                        ("from_scratch", [])):
      run = work / f"mm1_{name}"
      wall = _train([py, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
                     "--gin_file=gin/encoders/aimv2_tiny.gin", f"--workdir={run}",
                     "--gin.train.train.progress=False", *train_flags, *extra], run, work / f"mm1_{name}.log")
      final = newest_eval(run)
      result["mm1_quickstart_aimv2_encoder"][name] = {
          "train_wall_s": wall, "eval_step": int(final.stem.split("_")[1]),
          "results": json.loads(final.read_text())["results"], "losses": _losses(run)}
  write_record(out, result, git=git, benchmark="encoder_pretraining")
  return 0


if __name__ == "__main__":
  sys.exit(main())
