"""Faults a run survives: non-finite steps, preemption, hard kills mid-save, a changed
device count, a changed config, and bad input at the command line."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from test_train import REPO, SMALL, _env, _fixed_batch, _mm1_train, _setup

from mm1_jax import optim, sharding, train
from mm1_jax.checkpoint import Checkpointer, NonfiniteStateError

FAULTY_TRAIN = Path(__file__).resolve().parent / "helpers" / "faulty_train.py"


def _equal_trees(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- NaN / Inf ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_nonfinite_step_leaves_parameters_and_optimizer_untouched(tiny_config):
  mesh, mesh_cfg, state, _, bsh, step = _setup(tiny_config)
  good = _fixed_batch(tiny_config)
  bad = dict(good, loss_weights=good["loss_weights"].copy())
  bad["loss_weights"][0, 0] = np.nan  # a corrupt record: the loss becomes NaN
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    state, _ = step(state, train.global_batch(good, bsh))
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = step(state, train.global_batch(bad, bsh))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["update_skipped"]) == 1
    assert _equal_trees(before, jax.device_get((state.params, state.opt_state)))
    assert (int(state.step), int(state.nonfinite_total), int(state.nonfinite_streak)) == (2, 1, 1)
    state, _ = step(state, train.global_batch(bad, bsh))
    assert (int(state.nonfinite_total), int(state.nonfinite_streak)) == (2, 2)
    # A finite step applies its update and ends the streak; the total stays. Its logged
    # learning rate is the one optax applies, at the optimizer's own count of applied updates
    # (1: the two skipped steps kept the old state), not at the step counter (3).
    count = int([s.count for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByScheduleState)) if isinstance(s, optax.ScaleByScheduleState)][0])
    schedule = optim.make_schedule(optim.OptimizerConfig(peak_lr=3e-3, warmup_steps=2), 20)
    state, metrics = step(state, train.global_batch(good, bsh))
    assert count == 1
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(count)))
    assert float(metrics["learning_rate"]) != pytest.approx(float(schedule(3)))
    assert int(metrics["update_skipped"]) == 0
    assert not _equal_trees(before[0], jax.device_get(state.params))
    assert (int(state.nonfinite_total), int(state.nonfinite_streak)) == (2, 0)


@pytest.mark.slow
def test_a_checkpoint_with_nan_parameters_is_never_written(tiny_config, tmp_path):
  _, _, state, _, _, _ = _setup(tiny_config)
  params = jax.tree.map(lambda x: x, state.params)
  params["decoder"]["ln_final"]["scale"] = params["decoder"]["ln_final"]["scale"].at[3].set(np.inf)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1)
  with pytest.raises(NonfiniteStateError, match=r"checkpoint 5: NaN/Inf in .*ln_final.*scale"):
    ckpt.save(5, state.replace(params=params), {"batches_consumed": 5})
  assert ckpt.save(6, state, {"batches_consumed": 6})  # a finite state is written
  ckpt.close()
  assert Checkpointer(tmp_path / "ckpt").all_steps() == [6]


def _faulty_train(workdir, fault: str, *extra, timeout=600):
  cmd = [sys.executable, str(FAULTY_TRAIN), fault, "--gin_file=gin/experiments/quickstart.gin",
         f"--workdir={workdir}", *SMALL, "--gin.EVALUATION=None", *extra]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_the_run_stops_naming_the_step(tmp_path):
  # Step 3 has a corrupt batch (skipped, training goes on); from step 6 on every batch is
  # corrupt, and the third in a row (step 8) stops the run.
  out = _faulty_train(tmp_path, "nan_steps=3,6-100", "--gin.TRAIN_STEPS=20",
                      "--gin.train.train.max_consecutive_nonfinite=3")
  assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
  assert "step 3: loss nan" in out.stdout and "update skipped (1 in a row, 1 in this run)" in out.stdout
  assert "stopping at step 8: loss or gradients were NaN/Inf at 3 consecutive steps 6..8" in out.stderr
  assert "parameters are those of step 5" in out.stderr
  assert "Traceback" not in out.stderr
  records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
  assert [records[s]["update_skipped"] for s in range(1, 8)] == [0, 0, 1, 0, 0, 1, 1]
  assert records[7]["nonfinite_total"] == 3 and np.isfinite(records[5]["loss"])
  # Every checkpoint written holds finite numbers; the one at step 6 equals step 5's model.
  ckpt = Checkpointer(tmp_path / "checkpoints")
  steps = ckpt.all_steps()
  assert 6 in steps, steps
  from mm1_jax.checkpoint import load_checkpoint_params
  for s in steps:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_checkpoint_params(tmp_path / "checkpoints", s)))
  ckpt.close()


# --- preemption and hard kills -------------------------------------------------------

def _losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())}


# SIGTERM, then resume bit for bit: tests/test_buckets.py runs it with the workdir in a bucket.


@pytest.mark.slow
def test_a_kill_during_an_async_save_falls_back_to_the_last_complete_checkpoint(tmp_path):
  # SIGKILL once checkpoint 4's arrays are on disk but before it is committed.
  out = _faulty_train(tmp_path, "kill_before_commit=4", "--gin.TRAIN_STEPS=6")
  assert out.returncode == -signal.SIGKILL, out.stdout[-3000:] + out.stderr[-3000:]
  partial = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("4.")]
  assert partial, "the kill should leave checkpoint 4's temporary folder behind"
  assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 2  # orbax also keeps step 1
  out = _mm1_train(tmp_path, "--gin.TRAIN_STEPS=6", "--gin.EVALUATION=None")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"resumed from {tmp_path / 'checkpoints'}/2" in out.stdout
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("4.")]
  assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 6


# --- a hung step -----------------------------------------------------------------------

HANG_FLAGS = ["--gin.TRAIN_STEPS=8", "--gin.EVALUATION=None", "--gin.train.train.hang_factor=5",
              "--gin.train.train.hang_min_seconds=20", "--gin.train.train.hang_warmup_steps=2"]


@pytest.mark.slow
def test_a_hung_step_dumps_every_stack_and_exits_for_a_restart(tmp_path):
  # Step 6 never finishes (steps take well under a second here; the deadline is at least
  # 20 s): the watchdog dumps the stacks, records the hang and exits 75.
  out = _faulty_train(tmp_path, "stall_step=6", *HANG_FLAGS)
  assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
  assert "stalling step 6" in out.stdout
  for text in (out.stderr, (tmp_path / "hang_host0.txt").read_text()):
    assert "hang: step 6 has run" in text and "exits 75" in text, text[-3000:]
    # Every thread's stack, the stalled main thread's down to the sleeping frame.
    assert "Thread 0x" in text and 'faulty_train.py", line' in text and "in global_batch" in text, text[-3000:]
  ledger = json.loads((tmp_path / "goodput.json").read_text())
  (hung,) = ledger["attempts"]
  assert hung["exit"]["reason"] == "hang" and hung["exit"]["code"] == 75 and hung["exit"]["step"] == 6
  assert hung["step"] == 5 and ledger["summary"]["hangs"] == 1
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  # Logged mid-step: a record counts the steps before its own (step 1 only compiled).
  assert all(0 < r["goodput"] < 1 and "badput_compile" in r for r in records[2:])
  # The same command resumes from the newest checkpoint; step 5, done after it, is lost.
  out = _mm1_train(tmp_path, *HANG_FLAGS)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  restored = int(out.stdout.split(f"resumed from {tmp_path / 'checkpoints'}/")[1].split()[0])
  assert restored in (2, 4), out.stdout[-3000:]  # 4, unless its async save had not committed
  ledger = json.loads((tmp_path / "goodput.json").read_text())
  first, second = ledger["attempts"]
  assert first["lost_steps"] == 5 - restored and first["buckets"]["lost"] > 0
  assert second["exit"]["reason"] == "done" and second["start_step"] == restored
  s = ledger["summary"]
  assert s["attempts"] == 2 and s["hangs"] == 1 and s["lost_steps"] == 5 - restored
  assert s["badput"]["lost"] > 0 and s["badput"]["startup"] > 0 and s["badput"]["compile"] > 0
  assert s["goodput"] + sum(s["badput"].values()) == pytest.approx(1)
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == 8 and last["badput_lost"] > 0
  assert "over 2 attempts" in out.stdout and "1 hang" in out.stdout


# --- a different device count --------------------------------------------------------

@pytest.mark.slow
def test_restore_onto_fewer_devices_reshards(tiny_config, tmp_path):
  mesh, mesh_cfg, state, shardings, bsh, step = _setup(tiny_config)  # 8 devices, fsdp=2
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    state, _ = step(state, train.global_batch(_fixed_batch(tiny_config), bsh))
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1)
  ckpt.save(1, state, {"batches_consumed": 1})
  ckpt.close()

  small_cfg = sharding.MeshConfig(shape=(-1, 4, 1))
  small = sharding.make_mesh(small_cfg, jax.devices()[:4])
  from mm1_jax import optim
  from mm1_jax.model import MM1
  tx, _ = optim.make_optimizer(optim.OptimizerConfig(peak_lr=3e-3, warmup_steps=2), 20)
  abstract, target = train.abstract_train_state(MM1(tiny_config), tx, train.dummy_batch(8, 32, 2, tiny_config),
                                                small, small_cfg.rules)
  restored, data = Checkpointer(tmp_path / "ckpt").restore(1, abstract)
  assert data == {"batches_consumed": 1}
  assert _equal_trees(jax.device_get(state), jax.device_get(restored))
  for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert leaf.sharding == want and len(leaf.sharding.device_set) == 4


@pytest.mark.slow
def test_a_run_resumes_on_half_the_devices(tmp_path):
  def train_on(devices, workdir):
    env = dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
           f"--workdir={workdir}", *SMALL, "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8",
           "--gin.EVALUATION=None"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout

  # 4 steps on 8 devices, checkpoints at 2 and 4: the reference.
  assert "'data': 8" in train_on(8, tmp_path / "straight")
  # The same run as if stopped at step 2, continued on 4 devices.
  run = tmp_path / "run"
  shutil.copytree(tmp_path / "straight", run)
  shutil.rmtree(run / "checkpoints" / "4")
  for name in ("metrics.jsonl", "train_done.json"):
    (run / name).unlink()
  out = train_on(4, run)
  assert f"resumed from {run / 'checkpoints'}/2" in out and "'data': 4" in out
  got, want = _losses(run), _losses(tmp_path / "straight")
  assert sorted(got) == [3, 4]
  # Same data, same model; only the reduction order of a 4-way split differs.
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=2e-5)


# --- one run per workdir ---------------------------------------------------------------

def test_a_workdir_refuses_a_run_with_another_config(tmp_path):
  from mm1_jax.gin_checks import ConfigError, check_workdir_config

  old = "BATCH_SIZE = 8\nTRAIN_STEPS = 5\ntrain.train.stop_after_steps = 2\n"
  (tmp_path / "config.gin").write_text(old)
  # A workdir that holds no run yet takes any config.
  assert check_workdir_config(tmp_path, "TRAIN_STEPS = 6\n", allow_change=False) is None
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  # How long this invocation runs is not part of the run's identity.
  assert check_workdir_config(tmp_path, old.replace("= 2", "= 3"), allow_change=False) is None
  new = old.replace("TRAIN_STEPS = 5", "TRAIN_STEPS = 6")
  with pytest.raises(ConfigError) as e:
    check_workdir_config(tmp_path, new, allow_change=False)
  assert "-TRAIN_STEPS = 5\n+TRAIN_STEPS = 6" in str(e.value) and "--allow_config_change" in str(e.value)
  assert (tmp_path / "config.gin").read_text() == old  # nothing touched
  archived = Path(check_workdir_config(tmp_path, new, allow_change=True))
  assert archived.read_text() == old and not (tmp_path / "config.gin").exists()


# --- bad input at the command line ------------------------------------------------------

def _run_cli(main, argv, capsys) -> tuple[int, str]:
  try:
    code = main(argv)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  err = capsys.readouterr().err
  return code, err


@pytest.mark.parametrize("flags, message", [
    (["--gin_file=gin/runs/nope.gin"], "gin file gin/runs/nope.gin not found"),
    (["--gin.train.train.foo=1"], "Configurable 'train.train' doesn't have a parameter named 'foo'.\n"
                                  "  In --gin.train.train.foo=1"),
    (["--gin.pipeline.DataConfg.batch_size=3"], "No configurable matching 'pipeline.DataConfg'"),
    (["--gin.TRAIN_STEPS='10'"], "train.train.train_steps expects int, got str (%TRAIN_STEPS = '10', "
                                 "set in --gin.TRAIN_STEPS='10')"),
    (["--gin.pipeline.DataConfig.batch_size=2.5"], "pipeline.DataConfig.batch_size expects int, got float"),
    (["--gin.vit.ViTConfig.depth=True"], "vit.ViTConfig.depth expects int, got bool"),
    (["--gin.train.train.train_steps=%NOPE"], "macro %NOPE is used but never set"),
    (["--gin.TRAIN_STEPS=abc("], "SyntaxError"),
    (["--module_import=no_such_module"], "--module_import=no_such_module: No module named 'no_such_module'"),
])
def test_train_config_errors_are_one_clear_message(flags, message, tmp_path, capsys, clean_gin):
  from mm1_jax import cli
  argv = ["--gin_file=gin/experiments/quickstart.gin", f"--workdir={tmp_path}", *flags]
  if flags[0].startswith("--gin_file"):
    argv = argv[1:]
  code, err = _run_cli(cli.main_train, argv, capsys)
  assert code == 2 and message in err, err
  assert "Traceback" not in err and err.count("\n") <= 6, err
  assert not (tmp_path / "config.gin").exists()


def test_a_wrong_type_in_a_file_names_the_file_and_line(tmp_path, capsys, clean_gin):
  from mm1_jax import cli
  (tmp_path / "exp.gin").write_text(
      "from __gin__ import dynamic_registration\nfrom mm1_jax import optim\n"
      "include 'gin/experiments/quickstart.gin'\n\noptim.OptimizerConfig:\n  weight_decay = 0.1\n"
      "  warmup_steps = '40'\n")
  code, err = _run_cli(cli.main_train, [f"--gin_file={tmp_path / 'exp.gin'}", f"--workdir={tmp_path / 'w'}"],
                       capsys)
  assert code == 2, err
  assert f"optim.OptimizerConfig.warmup_steps expects int, got str ('40', set in {tmp_path / 'exp.gin'}:7)" in err


def test_train_refuses_a_workdir_with_another_run(tmp_path, capsys, clean_gin):
  from mm1_jax import cli
  (tmp_path / "config.gin").write_text("TRAIN_STEPS = 5\n")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  code, err = _run_cli(cli.main_train, ["--gin_file=gin/experiments/quickstart.gin", f"--workdir={tmp_path}"], capsys)
  assert code == 2 and "holds a run with another config" in err and "-TRAIN_STEPS = 5" in err
  assert (tmp_path / "config.gin").read_text() == "TRAIN_STEPS = 5\n"


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint_dir=/nonexistent/checkpoints"], "no checkpoint folder at /nonexistent/checkpoints"),
    (["--checkpoint_dir={ckpt}", "--benchmarks=coco,cocoo", "--gin_file=gin/models/mm1_tiny.gin"],
     "unknown benchmark 'cocoo'; known: coco, gqa"),
    (["--checkpoint_dir={ckpt}"], "config.gin does not exist: give the model's gin file too"),
])
def test_eval_input_errors(flags, message, tmp_path, capsys, clean_gin):
  from mm1_jax import cli
  (tmp_path / "checkpoints").mkdir()
  argv = ["--gin_file=gin/eval/fewshot.gin", *(f.format(ckpt=tmp_path / "checkpoints") for f in flags)]
  code, err = _run_cli(cli.main_eval, argv, capsys)
  assert code == 2 and message in err, err
  assert "Traceback" not in err


def test_only_orbax_and_safetensors_are_read(tmp_path):
  """Nothing in the package can unpickle: no pickle, torch.load or allow_pickle."""
  sources = [p for p in (REPO / "mm1_jax").rglob("*.py")]
  banned = ("import pickle", "pickle.load", "torch.load", "allow_pickle=True", "joblib", "dill")
  for path in sources:
    text = path.read_text()
    assert not [b for b in banned if b in text], path
  # Hugging Face directories are read through safetensors only, a .bin is refused.
  from mm1_jax.hf import convert
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
  with pytest.raises(convert.ConversionError, match="no \\*.safetensors files"):
    convert.to_params("llama", tmp_path)
