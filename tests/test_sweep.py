"""mm1-sweep: sweep files and --grid, the cartesian grid, resuming, the table (mean and
standard error over seeds), plots, TPU launch commands, and one real two-cell sweep."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mm1_jax import gin_files, sweep

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "gin/experiments/quickstart.gin"
LAUNCH = "tpu_scripts/launch.py"  # printed, never run here
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # tpu_scripts/_pod.py's rule


# --- axes and cells ---------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_with_unique_file_safe_names():
  axes = sweep.parse_grid("PEAK_LR=[1e-3, 2e-3, 4e-3]; vit.ViTConfig.image_size=[32, 64];"
                          "MIXTURE_OR_TASK_NAME=['mm1_shapes caption/v1', 'mm1_shapes_text']")
  assert [a.name for a in axes] == ["PEAK_LR", "vit.ViTConfig.image_size", "MIXTURE_OR_TASK_NAME"]
  cells = sweep.expand(axes)
  assert len(cells) == 3 * 2 * 2
  # First axis slowest; each cell binds one value of every axis, as gin text.
  assert cells[0].bindings == ("PEAK_LR = 0.001", "vit.ViTConfig.image_size = 32",
                               "MIXTURE_OR_TASK_NAME = 'mm1_shapes caption/v1'")
  assert cells[-1].bindings == ("PEAK_LR = 0.004", "vit.ViTConfig.image_size = 64",
                                "MIXTURE_OR_TASK_NAME = 'mm1_shapes_text'")
  combos = {c.bindings for c in cells}
  assert len(combos) == 12
  slugs = [c.slug for c in cells]
  assert len(set(slugs)) == len(slugs)
  for s in slugs:
    assert RUN_NAME.fullmatch(s) and "/" not in s and s not in (".", ".."), s
  assert cells[0].slug == "peak_lr-0.001__image_size-32__mixture_or_task_name-mm1_shapes_caption_v1"


def test_labelled_levels_grouped_axes_and_gin_files():
  text = """
from __gin__ import dynamic_registration
MIXTURE_RATES = {"even": {"a": 1, "b": 1}, "a_heavy": {"a": 9, "b": 1}}
conn/GIN_FILE = {"avg": "gin/connectors/avg_pool.gin", "shuffle": ["gin/connectors/pixel_shuffle.gin"]}
conn/IMAGE_TOKENS = {"avg": 16}
conn/connector.CAbstractorConfig.hidden = {"cabs": 128}
GIN_FILE = [["gin/a.gin", "gin/b.gin"], "gin/c.gin"]
"""
  axes = sweep.parse_axes(text, "t.gin")
  assert [a.name for a in axes] == ["MIXTURE_RATES", "conn", "GIN_FILE"]
  rates, conn, files = axes
  assert [lv.label for lv in rates.levels] == ["even", "a_heavy"]
  assert rates.levels[1].bindings == ("MIXTURE_RATES = {'a': 9, 'b': 1}",)
  assert [lv.label for lv in conn.levels] == ["avg", "shuffle", "cabs"]
  assert conn.levels[0] == sweep.Level("avg", ("gin/connectors/avg_pool.gin",), ("IMAGE_TOKENS = 16",))
  assert conn.levels[1] == sweep.Level("shuffle", ("gin/connectors/pixel_shuffle.gin",), ())
  assert conn.levels[2] == sweep.Level("cabs", (), ("connector.CAbstractorConfig.hidden = 128",))
  assert [lv.label for lv in files.levels] == ["a+b", "c"]
  assert files.levels[0].files == ("gin/a.gin", "gin/b.gin")
  cells = sweep.expand(axes)
  assert len(cells) == 2 * 3 * 2
  cell = cells[0]
  assert cell.files == ("gin/connectors/avg_pool.gin", "gin/a.gin", "gin/b.gin")
  assert dict(cell.labels) == {"MIXTURE_RATES": "even", "conn": "avg", "GIN_FILE": "a+b"}


def test_references_and_macros_keep_their_gin_text():
  (axis,) = sweep.parse_axes("x/model.MM1Config.connector = {'a': @connector.LinearConfig(), 'b': %OTHER}\n")
  assert [lv.bindings for lv in axis.levels] == [("model.MM1Config.connector = @connector.LinearConfig()",),
                                                 ("model.MM1Config.connector = %OTHER",)]


def test_long_labels_are_cut_with_a_hash_and_stay_distinct():
  values = [{"mm1_shapes_caption": 45 + i, "mm1_shapes_interleaved": 45, "mm1_shapes_text": 10} for i in range(3)]
  cells = sweep.expand(sweep.parse_axes(f"MIXTURE_RATES = {values!r}\n"))
  slugs = [c.slug for c in cells]
  assert len(set(slugs)) == 3
  assert all(len(s) <= sweep.MAX_SLUG and RUN_NAME.fullmatch(s) for s in slugs), slugs


@pytest.mark.parametrize("grid, message", [
    ("PEAK_LR=1e-3", "non-empty list"),
    ("PEAK_LR=[]", "non-empty list"),
    ("PEAK_LR=[1e-3, 2e-3", "not valid gin syntax"),
    ("PEAK_LR", "not NAME=[v1,v2"),
    ("PEAK_LR=[1, 2];PEAK_LR=[3]", "declared twice"),
    ("NAME=['a b', 'a/b']", "same folder name"),
    ("x/NAME=[1, 2]", "is a dict"),
    ("a/b/NAME={'x': 1}", "one axis name"),
    ("NAME={1: 2}", "labels are strings"),
    ("GIN_FILE=[3]", "GIN_FILE values"),
])
def test_bad_grid_is_refused_with_exit_code_2(grid, message, tmp_path, capsys):
  code = sweep.main([f"--gin_file={QUICKSTART}", f"--grid={grid}", f"--root={tmp_path}"])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and message in err, err
  assert not (tmp_path / sweep.SWEEP_FILE).exists()


def test_missing_inputs_exit_2(tmp_path, capsys):
  assert sweep.main([f"--root={tmp_path}", "--grid=A=[1]"]) == 2
  assert "--gin_file" in capsys.readouterr().err
  assert sweep.main([f"--gin_file={QUICKSTART}", f"--root={tmp_path}"]) == 2
  assert "no axes" in capsys.readouterr().err
  assert sweep.main([f"--gin_file={QUICKSTART}", f"--root={tmp_path}", "--sweep=gin/ablations/nope.sweep"]) == 2
  assert "not found" in capsys.readouterr().err
  assert sweep.main(["--report_only", f"--root={tmp_path}"]) == 2
  assert "no sweep.json" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    sweep.main([f"--gin_file={QUICKSTART}", "--grid=A=[1]"])  # --root is required
  assert e.value.code == 2


def test_help(capsys):
  with pytest.raises(SystemExit) as e:
    sweep.main(["--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0
  for flag in ("--gin_file", "--gin.NAME=VALUE", "--sweep", "--grid", "--seeds", "--root", "--metrics",
               "--dry_run", "--report_only", "--jobs", "--pod_flags"):
    assert flag in out, flag


# --- the configuration of every cell ----------------------------------------------------------

SWEEP_FILES = sorted(p.name for p in (REPO / "gin" / "ablations").glob("*.sweep"))


def test_mm1_axes_ship_as_sweep_files():
  assert {"image_resolution.sweep", "image_tokens.sweep", "connector.sweep", "mixture.sweep"} <= set(SWEEP_FILES)


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_shipped_sweep_files_parse_and_bind_on_the_quickstart(name):
  """Each cell of each gin/ablations file is a valid config of its base, as mm1-train checks it."""
  search = gin_files.search_paths()
  axes = sweep.read_sweep_file(f"gin/ablations/{name}", search)
  cells = sweep.expand(axes)
  assert len(cells) >= 2
  evaluates = sweep.check_cells(cells, [QUICKSTART], [], search, sweep.SEED_BINDINGS.split(","))
  assert evaluates == {c.slug: True for c in cells}


def test_a_binding_the_base_config_lacks_fails_naming_the_cell(tmp_path, capsys):
  code = sweep.main([f"--gin_file={QUICKSTART}", "--grid=vit.ViTConfig.image_sise=[32, 64]",
                     f"--root={tmp_path}"], runner=_never)
  err = capsys.readouterr().err
  assert code == 2 and "cell image_sise-32" in err and "image_sise" in err, err
  code = sweep.main([f"--gin_file={QUICKSTART}", "--grid=TRAIN_STEPZ=[1, 2]", f"--root={tmp_path}"],
                    runner=_never)
  err = capsys.readouterr().err
  assert code == 2 and "TRAIN_STEPZ" in err and "TRAIN_STEPS" in err, err


def _never(command, log):
  raise AssertionError(f"nothing should run: {command}")


# --- running and resuming -----------------------------------------------------------------------

def _finish(workdir: Path, step: int, score: float, loss: float, eval_file: bool = True):
  """What a finished mm1-train run leaves: metrics.jsonl, eval/step_<N>.json, train_done.json."""
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": step, "loss": loss}) + "\n")
  if eval_file:
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / f"step_{step}.json").write_text(json.dumps(
        {"step": step, "results": {"shapes_vqa/0shot/accuracy": score,
                                   "shapes_vqa/0shot/accuracy/shape": score / 2,
                                   "shapes_vqa/0shot/tokens_per_s": 1e3}}))
  (workdir / "train_done.json").write_text(json.dumps({"step": step}))


class FakeTrain:
  """Stands in for mm1-train: records each command and finishes the run it names."""

  def __init__(self, fail=()):
    self.commands, self.fail = [], set(fail)

  def __call__(self, command, log):
    self.commands.append(list(command))
    flags = dict(a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a)
    workdir = Path(flags["workdir"])
    if workdir.name in self.fail:
      return 1
    seed = int(flags["gin.train.train.seed"])
    assert flags["gin.pipeline.DataConfig.seed"] == str(seed)
    size = int(flags["gin.vit.ViTConfig.image_size"])
    _finish(workdir, 2, score=size / 100 + seed / 10, loss=3.0 - seed)
    return 0


def test_sweep_runs_each_cell_and_seed_once_and_resumes(tmp_path, capsys):
  root = tmp_path / "study"
  argv = [f"--gin_file={QUICKSTART}", "--grid=vit.ViTConfig.image_size=[32, 64]", "--seeds=2",
          f"--root={root}", "--gin.TRAIN_STEPS=2", "--no_progress"]
  # Before the sweep: one run finished, one half done (no train_done.json), one finished
  # without its final eval result.
  _finish(root / "image_size-32" / "seed0", 2, 0.9, 1.0)
  (root / "image_size-64" / "seed0").mkdir(parents=True)
  (root / "image_size-64" / "seed0" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
  _finish(root / "image_size-64" / "seed1", 2, 0.9, 1.0, eval_file=False)
  fake = FakeTrain()
  assert sweep.main(argv, runner=fake) == 0
  ran = sorted(c[c.index("train") + 1:][-1] for c in fake.commands)
  workdirs = sorted(next(a for a in c if a.startswith("--workdir=")) for c in fake.commands)
  assert workdirs == [f"--workdir={root}/image_size-32/seed1", f"--workdir={root}/image_size-64/seed0",
                      f"--workdir={root}/image_size-64/seed1"], ran
  cmd = fake.commands[0]
  assert cmd[1:4] == ["-m", "mm1_jax", "train"] and f"--gin_file={QUICKSTART}" in cmd
  assert "--gin.TRAIN_STEPS=2" in cmd and "--gin.vit.ViTConfig.image_size=32" in cmd
  record = json.loads((root / "sweep.json").read_text())
  assert [(r["cell"], r["seed"], r["state"]) for r in record["runs"]] == [
      ("image_size-32", 0, "done"), ("image_size-32", 1, "done"),
      ("image_size-64", 0, "done"), ("image_size-64", 1, "done")]
  assert "attempts" not in record["runs"][0] and record["runs"][1]["attempts"] == 1
  assert (root / "table.md").exists() and (root / "plots" / "shapes_vqa__0shot__accuracy.png").exists()

  # Again: nothing left to run, and what the first pass recorded is kept.
  again = FakeTrain()
  assert sweep.main(argv, runner=again) == 0
  assert again.commands == []
  assert json.loads((root / "sweep.json").read_text())["runs"] == record["runs"]


def test_a_failed_run_is_recorded_and_retried_on_the_next_pass(tmp_path, capsys):
  root = tmp_path / "study"
  argv = [f"--gin_file={QUICKSTART}", "--grid=vit.ViTConfig.image_size=[32]", "--seeds=2",
          f"--root={root}", "--no_progress"]
  assert sweep.main(argv, runner=FakeTrain(fail={"seed1"})) == 1
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  assert [(r["state"], r.get("returncode")) for r in runs] == [("done", 0), ("failed", 1)]
  assert "n=1, no SE" in (root / "table.md").read_text()
  retry = FakeTrain()
  assert sweep.main(argv, runner=retry) == 0
  assert [next(a for a in c if a.startswith("--workdir=")) for c in retry.commands] == [
      f"--workdir={root}/image_size-32/seed1"]
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  assert [(r["state"], r["attempts"]) for r in runs] == [("done", 1), ("done", 2)]
  # Each attempt's code version is kept, so that a sweep resumed at another commit says so.
  assert [len(r["code_versions"]) for r in runs] == [1, 2]
  assert all(re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", v) for r in runs for v in r["code_versions"])


def test_code_version_is_none_outside_a_checkout(monkeypatch):
  def no_git(*args, **kwargs):
    raise OSError("git: not found")

  monkeypatch.setattr(sweep.subprocess, "run", no_git)
  assert sweep.code_version() is None


def test_run_is_done_needs_the_final_eval_only_when_the_run_evaluates(tmp_path):
  _finish(tmp_path / "a", 7, 0.5, 1.0, eval_file=False)
  assert not sweep.run_is_done(tmp_path / "a", evaluates=True)
  assert sweep.run_is_done(tmp_path / "a", evaluates=False)
  (tmp_path / "a" / "eval").mkdir()
  (tmp_path / "a" / "eval" / "step_0.json").write_text(json.dumps({"step": 0, "results": {}}))
  assert not sweep.run_is_done(tmp_path / "a", evaluates=True)  # step 0's result is not the final one
  (tmp_path / "a" / "eval" / "step_7.json").write_text(json.dumps({"step": 7, "results": {}}))
  assert sweep.run_is_done(tmp_path / "a", evaluates=True)
  assert not sweep.run_is_done(tmp_path / "b", evaluates=False)


# --- the table and plots --------------------------------------------------------------------------

def _record(root: Path, cells: dict[str, dict[str, str]], seeds: int) -> dict:
  axes = list(next(iter(cells.values())))
  return {"axes": [{"name": a} for a in axes], "seeds": list(range(seeds)), "metrics": None,
          "cells": [{"slug": s, "labels": [[a, v] for a, v in labels.items()]} for s, labels in cells.items()],
          "runs": [{"cell": s, "seed": k, "workdir": str(root / s / f"seed{k}")} for s in cells for k in range(seeds)]}


def test_table_mean_and_standard_error_over_seeds(tmp_path, capsys):
  root = tmp_path
  record = _record(root, {"a": {"X": "1"}, "b": {"X": "2"}}, seeds=3)
  for k, (score, loss) in enumerate([(0.2, 2.0), (0.4, 3.0), (0.6, 7.0)]):
    wd = root / "a" / f"seed{k}"
    _finish(wd, 0, 0.99, 9.0)  # an earlier eval and metric record: not the final ones
    _finish(wd, 10, score, loss)
  _finish(root / "b" / "seed0", 10, 0.5, 4.0)  # b: one seed of three
  (root / sweep.SWEEP_FILE).write_text(json.dumps(record))
  assert sweep.main(["--report_only", f"--root={root}"]) == 0
  table = json.loads((root / "table.json").read_text())
  assert table["metrics"] == ["shapes_vqa/0shot/accuracy", "train/loss"]  # no throughput, no per-type score
  a, b = table["cells"]
  acc = a["stats"]["shapes_vqa/0shot/accuracy"]
  assert acc["n"] == 3 and acc["mean"] == pytest.approx(0.4) and acc["se"] == pytest.approx(0.11547, abs=1e-5)
  loss = a["stats"]["train/loss"]  # sample std of 2, 3, 7 is sqrt(7)
  assert loss["mean"] == pytest.approx(4.0) and loss["se"] == pytest.approx(math.sqrt(7) / math.sqrt(3))
  assert b["stats"]["train/loss"] == {"n": 1, "mean": 4.0, "se": None, "seeds": [0], "values": [4.0]}
  md = (root / "table.md").read_text()
  assert "| X " in md and "0.4000 ± 0.1155 (n=3)" in md and "4.0000 (n=1, no SE)" in md
  assert "short of results" in md and "b" in md.split("short of results")[1]
  # --metrics picks and orders the columns.
  assert sweep.main(["--report_only", f"--root={root}", "--metrics=train/loss"]) == 0
  assert json.loads((root / "table.json").read_text())["metrics"] == ["train/loss"]
  # A per-type score is left out by default but reported when named.
  assert sweep.main(["--report_only", f"--root={root}", "--metrics=shapes_vqa/0shot/accuracy/shape"]) == 0
  shape = json.loads((root / "table.json").read_text())["cells"][0]["stats"]["shapes_vqa/0shot/accuracy/shape"]
  assert shape["n"] == 3 and shape["mean"] == pytest.approx(0.2)


def test_summarize():
  assert sweep.summarize([]) == {"n": 0, "mean": None, "se": None}
  assert sweep.summarize([0.3]) == {"n": 1, "mean": 0.3, "se": None}
  s = sweep.summarize([1.0, 3.0])
  assert s["mean"] == 2.0 and s["se"] == pytest.approx(1.0)  # std sqrt(2), / sqrt(2)


@pytest.mark.parametrize("two_axes", [False, True])
def test_plots_are_png_one_per_metric(tmp_path, two_axes):
  cells = ({f"r{r}_q{q}": {"R": str(r), "Q": str(q)} for r in (32, 64) for q in (4, 16)} if two_axes
           else {f"q{q}": {"Q": str(q)} for q in (4, 16, 64)})
  record = _record(tmp_path, cells, seeds=2)
  for i, run in enumerate(record["runs"]):
    _finish(Path(run["workdir"]), 3, 0.1 * i, 1.0 + i)
  table = sweep.report(tmp_path, record=record)
  written = sorted(p.name for p in (tmp_path / "plots").iterdir())
  assert written == ["shapes_vqa__0shot__accuracy.png", "train__loss.png"]
  for name in written:
    assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert all(c["stats"]["train/loss"]["n"] == 2 for c in table["cells"])


# --- TPU pods -----------------------------------------------------------------------------------------

def test_tpu_jobs_print_one_launch_command_per_run(tmp_path, capsys):
  pod = tmp_path / "pod.flags"
  pod.write_text("--name=p\n--project=x\n--zone=z\n--accelerator_type=v5p-8\n--bucket=gs://b/mm1\n")
  root = tmp_path / "study"
  code = sweep.main([f"--gin_file={QUICKSTART}", "--grid=PEAK_LR=[1e-3, 2e-3]", "--seeds=2",
                     f"--root={root}", "--jobs=tpu", f"--pod_flags=@{pod}", "--gin.TRAIN_STEPS=5"],
                    runner=_never)
  assert code == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if LAUNCH in line]
  assert len(lines) == 4
  assert (root / "launch_commands.sh").read_text().splitlines() == lines
  record = json.loads((root / "sweep.json").read_text())
  names = set()
  for run, line in zip(record["runs"], lines):
    words = line.split()
    assert words[:3] == ["python", LAUNCH, f"@{pod}"]
    name = next(w for w in words if w.startswith("--run_name=")).split("=", 1)[1]
    assert RUN_NAME.fullmatch(name) and name.startswith("study-")
    names.add(name)
    assert f"--gin.train.train.seed={run['seed']}" in words and "--gin.TRAIN_STEPS=5" in words
    assert f"--gin_file={QUICKSTART}" in words and not any(w.startswith("--workdir") for w in words)
    assert run["workdir"] == f"gs://b/mm1/runs/{name}"  # where launch.py puts it, read by --report_only
  assert len(names) == 4
  # launch.py's own parser takes these flags (nothing is run).
  sys.path.insert(0, str(REPO / "tpu_scripts"))
  try:
    import _pod
    import launch
  finally:
    sys.path.remove(str(REPO / "tpu_scripts"))
  argv, gin_flags = _pod.split_gin_flags(_pod._expand_flagfiles(lines[0].split()[2:]))
  args = launch.build_parser().parse_args(argv)
  assert args.run_name.startswith("study-") and args.gin_file == [QUICKSTART]
  assert any(f.startswith("--gin.PEAK_LR") or "PEAK_LR" in f for f in gin_flags), gin_flags


def test_tpu_jobs_need_pod_flags(tmp_path, capsys):
  assert sweep.main([f"--gin_file={QUICKSTART}", "--grid=A=[1]", f"--root={tmp_path}", "--jobs=tpu"]) == 2
  assert "--pod_flags" in capsys.readouterr().err


# --- a real sweep ---------------------------------------------------------------------------------------

SMALL = [
    "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.LOG_EVERY=1", "--gin.CHECKPOINT_EVERY=2",
    "--gin.fewshot.FewShotConfig.num_queries=4", "--gin.fewshot.FewShotConfig.batch_size=4",
    "--gin.fewshot.FewShotConfig.shots=(0,)", "--gin.fewshot.FewShotConfig.max_new_tokens=4",
    "--gin.train.train.eval_at_start=False",
]


@pytest.mark.slow
def test_real_sweep_two_seeds_then_nothing_retrained(tmp_path):
  """Two real mm1-train runs (one cell, two seeds; the grid and the statistics have their
  fast tests above). The seed changes the data order only, so the second run loads the
  first's programs from the test session's compilation cache."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  root = tmp_path / "study"
  rates = 'MIXTURE_RATES={"captions": {"mm1_shapes_caption": 80, "mm1_shapes_interleaved": 10, "mm1_shapes_text": 10}}'
  cmd = [sys.executable, "-m", "mm1_jax", "sweep", f"--gin_file={QUICKSTART}", f"--grid={rates}", "--seeds=2",
         "--seed_bindings=pipeline.DataConfig.seed", f"--root={root}", *SMALL]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  record = json.loads((root / "sweep.json").read_text())
  assert [r["state"] for r in record["runs"]] == ["done"] * 2
  assert "--gin.pipeline.DataConfig.seed=1" in record["runs"][1]["command"]
  table = json.loads((root / "table.json").read_text())
  assert [c["cell"] for c in table["cells"]] == ["mixture_rates-captions"]
  assert {"shapes_vqa/0shot/accuracy", "shapes_caption/0shot/cider", "train/loss"} <= set(table["metrics"])
  (cell,) = table["cells"]
  for metric in table["metrics"]:
    assert cell["stats"][metric]["n"] == 2, metric
  assert cell["stats"]["train/loss"]["se"] is not None
  losses = cell["stats"]["train/loss"]["values"]
  assert losses[0] != losses[1]  # the seeds give different batches, hence different losses
  assert "| MIXTURE_RATES" in (root / "table.md").read_text()
  assert (root / "plots" / "train__loss.png").read_bytes()[:4] == b"\x89PNG"
  done = {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/train_done.json")}
  assert len(done) == 2

  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/train_done.json")} == done
  rerun = json.loads((root / "sweep.json").read_text())
  assert [(r["state"], r["attempts"], r["started"]) for r in rerun["runs"]] == [
      (r["state"], 1, r["started"]) for r in record["runs"]]
