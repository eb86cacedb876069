"""The benchmark suite at tiny sizes: it measures, writes one record per benchmark, and
renders RESULTS.md from those records alone."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short_suite(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("suite")
  out = tmp_path_factory.mktemp("out") / "figures.json"  # not a record: outside the results folder
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as when run by hand
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--short", f"--results_dir={tmp}",
                         f"--json_out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return tmp, json.loads(out.read_text())


@pytest.mark.libtpu
def test_every_benchmark_writes_a_record_of_this_checkout(short_suite):
  """Catches records stamped with another commit or machine, or a benchmark that reports
  figures it did not write a record for."""
  tmp, figures = short_suite
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
  for name, figs in figures.items():
    rec = json.loads((tmp / "suite" / f"{name}.json").read_text())
    assert rec["benchmark"] == name and rec["figures"] == figs
    assert rec["commit"] == head and rec["short"] is True
    assert rec["command"].startswith("python -m benchmarks.run --short")
    assert rec["machine"]["cores"] == len(os.sched_getaffinity(0))
    assert "GFLOP/s" in rec["machine"]["cpu_peak_derivation"]
    assert {"python", "jax", "flax"} <= set(rec["packages"])
  # The preflight compiled (it is not read back from saved files).
  assert figures["preflight"]["quickstart_v5p-8.fits"] is True
  assert 0 < figures["preflight"]["quickstart_v5p-8.per_chip_gib"] < 1


@pytest.mark.libtpu
def test_moe_benchmark_runs_the_shipped_capacity_factor_and_records_drops(short_suite):
  """Catches a benchmark measured at a factor no preset ships, or one that hides drops."""
  from mm1_jax import moe

  _, figures = short_suite
  m = figures["moe_vs_dense"]
  assert m["capacity_factor"] == moe.MoEConfig().capacity_factor
  for name in ("gin/models/mm1_3b_moe.gin", "gin/models/mm1_7b_moe.gin", "gin/models/mm1_tiny_moe.gin"):
    assert re.search(rf"capacity_factor = {m['capacity_factor']}\b", (REPO / name).read_text()), name
  assert 0.0 <= m["capacity_drop_rate"] <= 1.0 and m["dropless_drop_rate"] == 0.0
  assert m["ratio"] == min(m["ratio_capacity"], m["ratio_dropless"])


@pytest.mark.libtpu
def test_results_md_is_rendered_from_the_records(short_suite):
  """Catches RESULTS.md figures that differ from the records (a stale or hand-edited table)."""
  tmp, figures = short_suite
  md = (tmp / "RESULTS.md").read_text()
  rec = json.loads((tmp / "suite" / "train_small.json").read_text())
  assert f"commit {rec['commit'][:10]}" in md
  row = re.search(r"\| tokens_per_s \| ([^|]+) \|", md.split("### train_small\n")[1]).group(1).strip()
  assert float(row) == pytest.approx(figures["train_small"]["tokens_per_s"], rel=1e-3)
  # Rendering again from the records alone gives the same page.
  before = md
  subprocess.run([sys.executable, "-m", "benchmarks.run", "--render", f"--results_dir={tmp}"], cwd=REPO,
                 check=True, capture_output=True)
  assert (tmp / "RESULTS.md").read_text() == before


def test_a_skipped_benchmark_says_so(tmp_path):
  """Catches a suite that re-stamps old figures for a benchmark it did not run."""
  suite = tmp_path / "suite"
  suite.mkdir()
  (suite / "preflight.json").write_text(json.dumps({"figures": {"mm1_3b.projected_mfu": 0.4}}))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--short", f"--results_dir={tmp_path}",
                         *[f"--skip={n}" for n in ("peak", "train_small", "train_small_cabs", "moe_vs_dense",
                                                    "decode", "peer", "loader", "preflight")]],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((suite / "preflight.json").read_text())["figures"] == {"skipped": "--skip preflight"}
