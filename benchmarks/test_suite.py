"""The test suite's own cost: wall time and outcome of each tier, from a fresh clone.

Clones the checkout's HEAD into a temporary folder (nothing untracked, no caches, a fresh
shapes-world corpus), runs the README's test command there (`pytest tests`, two xdist
workers as pytest.ini sets) or the fast tier (`pytest -m "not slow"`), `--runs` times in a
row, and writes one record with each run's wall time and counts. Budgets: the fast tier
under 3 minutes, everything under 20 minutes, on 2 cores.

  python benchmarks/test_suite.py --tier=fast --json_out=tests/fast_2core.json
  python benchmarks/test_suite.py --tier=all --runs=3 --json_out=tests/all_2core.json

The clone's own sources are first on PYTHONPATH, so its tests and the console scripts they
start (installed from this checkout, editable) run the clone's code; the record carries the
commit and whether the working tree differed from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import record  # noqa: E402  (after the checkout is on the path)

TIERS = {"fast": ["-m", "not slow"], "all": []}
BUDGET_S = {"fast": 180, "all": 1200}
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")
_DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S.*)$")


def counts(summary: str) -> dict[str, int]:
  """pytest's last line ('== 3 passed, 1 failed in 9.1s ==') -> {'passed': 3, 'failed': 1}."""
  out = {}
  for n, what in _COUNT.findall(summary):
    out["errors" if what.startswith("error") else what] = int(n)
  return out


def slowest(lines: list[str]) -> list[dict]:
  """pytest's --durations lines ('12.34s call     tests/test_x.py::test_y') -> records."""
  out = []
  for line in lines:
    if m := _DURATION.match(line.strip()):
      out.append({"s": float(m.group(1)), "phase": m.group(2), "test": m.group(3)})
  return out


def run_tier(clone: Path, tier: str, data_dir: Path, durations: int = 0) -> dict:
  cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", *TIERS[tier]]
  if durations:
    cmd.append(f"--durations={durations}")
  path = os.pathsep.join(p for p in (str(clone), os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, MM1_DATA_DIR=str(data_dir), PYTHONPATH=path)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  last, lines = "", []
  for line in proc.stdout:  # pytest's own progress, passed through
    sys.stdout.write(line)
    lines.append(line)
    if line.strip():
      last = line.strip()
  proc.wait()
  wall = time.perf_counter() - t0
  out = {"wall_s": round(wall, 1), "exit_code": proc.returncode, **counts(last), "summary": last}
  if durations:  # worker time of each test phase; with two workers the wall time is about half the sum
    out["slowest"] = slowest(lines)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tier", choices=sorted(TIERS), default="fast")
  p.add_argument("--runs", type=int, default=1, help="runs in a row, each in its own fresh clone")
  p.add_argument("--json_out", default=None, help="record path (relative: under benchmarks/results/)")
  p.add_argument("--durations", type=int, default=0, help="record the N slowest test phases of each run")
  args = p.parse_args(argv)
  git = record.git_state()
  runs = []
  for i in range(args.runs):
    with tempfile.TemporaryDirectory(prefix="mm1_suite_") as tmp:
      clone = Path(tmp) / "clone"
      subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
      print(f"run {i + 1}/{args.runs}: {args.tier} tier in {clone}", flush=True)
      runs.append(run_tier(clone, args.tier, Path(tmp) / "data", args.durations))
  walls = [r["wall_s"] for r in runs]
  figures = {"tier": args.tier, "runs": len(runs), "all_passed": all(r["exit_code"] == 0 for r in runs),
             "wall_s_max": max(walls), "wall_s_min": min(walls), "budget_s": BUDGET_S[args.tier],
             "within_budget": max(walls) <= BUDGET_S[args.tier], "per_run": runs}
  if args.json_out:
    record.write(args.json_out, "test_suite", figures, git=git)
  print(json.dumps(figures, indent=1))
  return figures


if __name__ == "__main__":
  sys.exit(0 if main()["all_passed"] else 1)
