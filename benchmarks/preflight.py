"""Runs the TPU preflight (mm1-aot) for every pod preset and tabulates the results.

  JAX_PLATFORMS=cpu python benchmarks/preflight.py            # all gin/pods/*.gin
  JAX_PLATFORMS=cpu python benchmarks/preflight.py --only mm1_3b_v5p-128
  JAX_PLATFORMS=cpu python benchmarks/preflight.py --only aim_600m_v5p-64 --no_cost   # memory only
  python benchmarks/preflight.py --table                       # the table from saved results

Each preset writes benchmarks/results/preflight/<preset>.json: a record (benchmarks/record.py:
commit, date, command, machine, packages) whose figures are mm1-aot's report plus the wall time.
A record compiled from a tree with uncommitted changes (`dirty`) also names the changed files
and the sha256 of `git diff HEAD` (`uncommitted`). A step time that mm1-aot corrected for ops
libtpu's cost model cannot cost (`cost_correction` in the figures) is marked in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from benchmarks import record  # noqa: E402  (after the checkout is on the path)

OUT = REPO / "benchmarks" / "results" / "preflight"


def aot_report(gin_file: str, args: list[str], scratch: Path, python: str = sys.executable,
               env: dict | None = None, echo: bool = False) -> dict:
  """mm1-aot's JSON report for `gin_file` and extra `args`, from a subprocess (libtpu is loaded
  there) run by `python` in this checkout; `scratch` is where the report is written first.
  Exit 1 (does not fit) still gives a report; any other failure stops the benchmark."""
  report_file = scratch / f".{Path(gin_file).stem}.{os.getpid()}.report.json"
  cmd = [python, "-m", "mm1_jax.aot", f"--gin_file={gin_file}", f"--json_out={report_file}", *args]
  t0 = time.perf_counter()
  env = env or dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if echo:
    print(proc.stdout)
  if proc.returncode not in (0, 1) or not report_file.exists():
    print(proc.stderr[-3000:], file=sys.stderr)
    raise SystemExit(f"{gin_file} {' '.join(args)}: mm1-aot failed ({proc.returncode})")
  report = json.loads(report_file.read_text())
  report_file.unlink()
  report["wall_s"] = round(time.perf_counter() - t0, 1)
  return report


def run(preset: Path, cost: bool = True) -> dict:
  """Compiles one preset with mm1-aot and writes its record (results/preflight/<preset>.json)."""
  out = OUT / f"{preset.stem}.json"
  git = record.git_state()  # the code mm1-aot loads now (before the old record goes: not a change)
  uncommitted = _uncommitted() if git[1] else None
  out.unlink(missing_ok=True)
  report = aot_report(str(preset.relative_to(REPO)), [] if cost else ["--no_cost"], OUT, echo=True)
  report["preset"] = str(preset.relative_to(REPO))
  command = f"JAX_PLATFORMS=cpu python -m mm1_jax.aot --gin_file={preset.relative_to(REPO)}" + (
      "" if cost else " --no_cost")
  extra = {"uncommitted": uncommitted} if uncommitted else {}
  return record.write(out, "preflight", report, command=command, git=git, **extra)


def _uncommitted() -> dict:
  """What a dirty tree changes against its commit: the tracked files that differ and the
  sha256 of `git diff HEAD` (the record's `commit` plus that diff is the code compiled)."""
  import hashlib

  diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
  files = subprocess.run(["git", "diff", "HEAD", "--name-only"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
  return {"files": files, "diff_sha256": hashlib.sha256(diff).hexdigest()}


def table(folder: Path = OUT) -> str:
  """The preset table, from the records (each row names the commit it was compiled at)."""
  rows = ["| preset | model | topology (chips) | mesh | per-chip memory | fits | projected MFU, useful (every slot) "
          "| tokens/s per chip, real (slots) | compile (scanned + costing) | commit |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  corrected = False
  for f in sorted(folder.glob("*.json")):
    rec = json.loads(f.read_text())
    r = rec["figures"]
    mesh = ", ".join(f"{k}={r['mesh'][k]}" for k in ("data", "fsdp", "tensor", "expert")
                     if r["mesh"].get(k, 1) > 1) or "1 device"
    mfu = "-" if r.get("projected_mfu") is None else f"{r['projected_mfu']:.1%} ({r['projected_mfu_slots']:.1%})"
    if r.get("projected_mfu") is not None and r.get("cost_correction"):
      mfu += f" \\* ({r['cost_correction']['sentinel_ops']:.0f} sentinels)"
      corrected = True
    tps = ("-" if r.get("tokens_per_s_per_chip") is None else
           f"{r['useful_tokens_per_s_per_chip']:,.0f} ({r['tokens_per_s_per_chip']:,.0f})")
    mem = "-" if r.get("per_chip_bytes") is None else f"{r['per_chip_bytes'] / 2**30:.1f} of {r['hbm_bytes'] / 2**30:.0f} GiB"
    params = f"{r['params_total'] / 1e9:.1f}B" + (f" ({r['params_active'] / 1e9:.1f}B active)"
                                                  if r["params_active"] != r["params_total"] else "")
    costing = f"{r['cost_compile_s']:.0f} s" if "cost_compile_s" in r else "not costed"
    rows.append(f"| `{Path(r.get('preset', f.stem)).name}` | {params} | {r['topology']} ({r['num_chips']}) | {mesh} | "
                f"{mem} | {'yes' if r['fits'] else 'no'} | {mfu} | {tps} | {r['compile_s']:.0f} s + {costing} | "
                f"{record.short_commit(rec)} |")
  if corrected:
    rows += ["", "\\* Step time corrected for ops libtpu's cost model cannot cost (-1 s each): the record's "
                 "`cost_correction` adds them back and prices the SparseCore calls they prepare "
                 "(docs/pods.md, \"Reading the report\")."]
  return "\n".join(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", action="append", default=[], help="preset name (repeatable)")
  p.add_argument("--table", action="store_true", help="print the table of saved results only")
  p.add_argument("--no_cost", action="store_true", help="memory only: skip the costing compiles")
  args = p.parse_args()
  if not args.table:
    OUT.mkdir(parents=True, exist_ok=True)
    presets = sorted((REPO / "gin" / "pods").glob("*.gin"))
    for preset in presets:
      if not args.only or preset.stem in args.only:
        run(preset, cost=not args.no_cost)
  print(table())


if __name__ == "__main__":
  main()
