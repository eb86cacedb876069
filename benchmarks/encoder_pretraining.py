"""Image-encoder pre-training on the bundled data, judged the two ways that matter here.

  python -m benchmarks.encoder_pretraining                 # everything, under an hour on 2 cores
  python -m benchmarks.encoder_pretraining --skip_mm1      # pre-training and probes only

1. AIM (gin/experiments/aim_pretrain.gin) and AIMv2 (gin/experiments/aimv2_pretrain.gin) as shipped:
   their losses at the first and last logged steps.
2. `mm1-probe --baseline` on each trunk: attentive probes on frozen features for count,
   colour and shape, against the same probes on the trunk at random initialisation.
3. MM1 quickstarts (gin/experiments/quickstart.gin with the AIMv2-tiny encoder) started from the
   AIMv2 trunk and from scratch: their few-shot evaluations at the end.

Writes benchmarks/results/encoder_pretraining_cpu.json (with the machine it ran on) and
keeps every run under --workdir; running it again keeps the finished training runs (and
their wall times) and redoes the probes and the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.jobs import REPO, record_header, run_logged, write_record

OUT = REPO / "benchmarks" / "results" / "encoder_pretraining_cpu.json"


def _train(cmd: list[str], run: Path, log: Path) -> float:
  """A training run; one that finished before (train_done.json) is kept, with its wall time."""
  wall_file = run / "wall_s.txt"
  if (run / "train_done.json").exists() and wall_file.exists():
    print(f"kept the finished run {run}", flush=True)
    return float(wall_file.read_text())
  wall = run_logged(cmd, log)
  wall_file.write_text(str(wall))
  return wall


def _losses(workdir: Path, keys: tuple[str, ...]) -> dict:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  first, last = records[0], records[-1]
  return {k: {"first_step": first["step"], "first": first[k], "last_step": last["step"], "last": last[k]}
          for k in keys}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/mm1_encoder_pretraining")
  p.add_argument("--skip_mm1", action="store_true", help="leave out the two MM1 quickstarts")
  args = p.parse_args(argv)
  work = Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  py = sys.executable
  from benchmarks import record

  git = record.git_state()  # the code this run loads
  result = record_header()
  for name, gin_file, keys in (("aim", "gin/experiments/aim_pretrain.gin", ("pixel_loss",)),
                               ("aimv2", "gin/experiments/aimv2_pretrain.gin", ("caption_loss", "pixel_loss"))):
    run = work / name
    wall = _train([py, "-m", "mm1_jax.cli", "train", f"--gin_file={gin_file}", f"--workdir={run}",
                   "--gin.train.train.progress=False"], run, work / f"{name}_train.log")
    probe_json = work / f"{name}_probe.json"
    probe_wall = run_logged([py, "-m", "mm1_jax.probe", f"--gin_file={gin_file}", f"--init_from={run / 'checkpoints'}",
                       "--baseline", "--no_progress", f"--json_out={probe_json}"], work / f"{name}_probe.log")
    result[name] = {"gin_file": gin_file, "train_wall_s": wall, "losses": _losses(run, keys),
                    "probe": json.loads(probe_json.read_text()), "probe_wall_s": probe_wall}
    print(json.dumps(result[name]["probe"]["tasks"], indent=1), flush=True)
  if not args.skip_mm1:
    result["mm1_quickstart_aimv2_encoder"] = {}
    for name, extra in (("from_aimv2", [f"--gin.train.init_from=['{work / 'aimv2' / 'checkpoints'}:encoder']"]),
                        ("from_scratch", [])):
      run = work / f"mm1_{name}"
      wall = _train([py, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
                     "--gin_file=gin/encoders/aimv2_tiny.gin", f"--workdir={run}",
                     "--gin.train.train.progress=False", *extra], run, work / f"mm1_{name}.log")
      final = sorted((run / "eval").glob("step_*[0-9].json"), key=lambda f: int(f.stem.split("_")[1]))[-1]
      result["mm1_quickstart_aimv2_encoder"][name] = {
          "train_wall_s": wall, "eval_step": int(final.stem.split("_")[1]),
          "results": json.loads(final.read_text())["results"], "losses": _losses(run, ("loss",))}
  write_record(OUT, result, git=git)
  return 0


if __name__ == "__main__":
  sys.exit(main())
