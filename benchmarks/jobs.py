"""Helpers of the benchmarks that drive whole runs through the command line."""

from __future__ import annotations

import collections
import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_logged(cmd: list[str], log: Path) -> float:
  """Runs a command from the repository root with its output in `log`; its wall time in seconds.
  A failure stops the benchmark, naming the log."""
  print("$", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open("w") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"failed ({proc.returncode}); see {log}")
  return round(time.perf_counter() - t0, 1)


def record_header() -> dict:
  """What every results file starts with: the machine, Python and the date."""
  return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
          "date": time.strftime("%Y-%m-%d")}


def write_record(path: Path, result: dict, git: tuple | None = None, benchmark: str | None = None) -> None:
  """The run's record (benchmarks/record.py), named `benchmark` (default: after the file); git:
  (commit, dirty) read when the run started."""
  from benchmarks import record

  record.write(Path(path).resolve(), benchmark or Path(path).stem, result, git=git)
  print(f"wrote {path}")


def supervised_encoder(py: str, out: Path, log: Path, gin_files=(), bindings=()) -> dict:
  """`mm1-supervised` on the quickstart's MODEL (and `gin_files`, `bindings`) into `out` (reused when
  it holds the same trunk); its command and result.json, for a record."""
  cmd = [py, "-m", "mm1_jax", "supervised", "--gin_file=gin/experiments/quickstart.gin",
         *(f"--gin_file={f}" for f in gin_files), *bindings, f"--out={out}", "--no_progress"]
  run_logged(cmd, log)
  return {"command": " ".join(cmd[1:]), **json.loads((Path(out) / "result.json").read_text())}


def newest_eval(folder: Path) -> Path:
  """The eval/step_<N>.json of `folder` with the largest N (by number: step_1000 after step_200)."""
  return max(Path(folder).glob("eval/step_*[0-9].json"), key=lambda f: int(f.stem.split("_")[1]))


def answers_by_type(task: str) -> dict[str, collections.Counter]:
  """The test split of a question task (seqio `task`, e.g. mm1_shapes_vqa_eval): per answer
  type, how often each first answer occurs."""
  import tasks  # noqa: F401, PLC0415  (registers the shapes-world seqio tasks)
  from mm1_jax.eval import fewshot  # noqa: PLC0415

  out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for q in fewshot.load_split(task, "test"):
    out[q["answer_type"]][q["answers"][0]] += 1
  return dict(out)
