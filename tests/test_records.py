"""Figures in the project's Markdown (the READMEs and docs/) trace to committed records, and
RESULTS.md is the rendering of those records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import check_figures, record, test_suite

REPO = Path(__file__).resolve().parent.parent


def test_documented_figures_come_from_records():
  """Catches a figure typed into README.md, benchmarks/README.md or a docs/ page that no
  record holds (or one left behind when its record was re-measured)."""
  problems = [p for f in check_figures.pages() for p in check_figures.check(f)]
  assert not problems, "\n".join(problems)


def test_the_figure_rule_covers_every_docs_page():
  """Catches a docs/ page (or a README) that the figure check, and so this suite, skips."""
  checked = {f.relative_to(REPO).as_posix() for f in check_figures.pages()}
  docs = {f.relative_to(REPO).as_posix() for f in (REPO / "docs").glob("*.md")}
  assert docs and docs <= checked
  assert {"README.md", "benchmarks/README.md"} <= checked
  assert all((REPO / f).is_file() for f in checked)


def test_the_checker_refuses_unrecorded_and_mismatched_figures(tmp_path):
  """Catches a checker that passes everything: a figure without a citation, a cited record
  that does not hold the figure, and a missing record are each reported."""
  rec = "results/preflight/mm1_3b_v5p-128.json"
  mfu = record.load(rec.split("results/", 1)[1])["figures"]["projected_mfu"]
  md = tmp_path / "page.md"
  md.write_text(f"The step takes 1.23 s.\n\nProjected MFU {mfu:.1%} (`{rec}`).\n\n"
                f"Projected MFU {mfu + 0.05:.1%} (`{rec}`).\n\nSee `results/nothing_here.json`: 4.2 s.\n\n"
                "<!-- not measured --> v5p peak: 459 TFLOP/s.\n")
  problems = check_figures.check(md)
  assert len(problems) == 4, problems
  assert "cite no record" in problems[0] and f"{mfu + 0.05:.1%}"[:-1] in problems[1]
  assert "does not exist" in problems[2] and "4.2 is in none" in problems[3]


@pytest.mark.slow
def test_results_md_is_rendered_from_the_committed_records(tmp_path):
  """Catches a RESULTS.md edited by hand or left stale after a record changed."""
  subprocess.run([sys.executable, "-m", "benchmarks.run", "--render",
                  f"--results_dir={REPO / 'benchmarks' / 'results'}"], cwd=REPO, check=True,
                 capture_output=True)
  rendered = (REPO / "benchmarks" / "results" / "RESULTS.md")
  try:
    assert rendered.read_text() == (REPO / "benchmarks" / "RESULTS.md").read_text()
  finally:
    rendered.unlink()


def test_every_new_record_names_its_commit_and_machine():
  """Catches a benchmark that writes figures without the facts that make them checkable."""
  for path, rec in record.all_records().items():
    if "schema" not in rec:
      continue  # legacy records: listed in RESULTS.md with the commit that added them
    assert len(rec["commit"]) == 40, path
    m = rec["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["isa"] is not None and "accelerator" in m, path
    assert {"python", "jax"} <= set(rec["packages"]), path
    json.dumps(rec["figures"])


def test_suite_record_reads_pytest_durations_and_summary():
  lines = ["============================= slowest 3 durations ==============================\n",
           "72.01s call     tests/test_sft.py::test_sft_runs_end_to_end_from_a_pretraining_checkpoint\n",
           "3.50s setup    tests/test_buckets.py::test_a_run_in_a_bucket[gs]\n",
           "(1 durations < 0.005s hidden.  Use -vv to show these durations.)\n",
           "1 failed, 925 passed, 2 skipped in 1175.80s (0:19:35)\n"]
  assert test_suite.slowest(lines) == [
      {"s": 72.01, "phase": "call", "test": "tests/test_sft.py::test_sft_runs_end_to_end_from_a_pretraining_checkpoint"},
      {"s": 3.5, "phase": "setup", "test": "tests/test_buckets.py::test_a_run_in_a_bucket[gs]"}]
  assert test_suite.counts(lines[-1]) == {"failed": 1, "passed": 925, "skipped": 2}
