"""Train step, checkpoints, and the mm1-train command end to end (including resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from mm1_jax import connector, flops, optim, sharding, train
from mm1_jax.checkpoint import Checkpointer
from mm1_jax.model import MM1

REPO = Path(__file__).resolve().parent.parent


def _setup(cfg, lr=3e-3, steps=20):
  mesh_cfg = sharding.MeshConfig(shape=(-1, 2, 1))
  mesh = sharding.make_mesh(mesh_cfg)
  tx, schedule = optim.make_optimizer(optim.OptimizerConfig(peak_lr=lr, warmup_steps=2), steps)
  batch = train.dummy_batch(8, 32, 2, cfg)
  state, shardings = train.init_train_state(MM1(cfg), tx, batch, jax.random.PRNGKey(0), mesh,
                                            mesh_cfg.rules)
  bsh = {k: sharding.batch_sharding(mesh, mesh_cfg.rules, v.ndim) for k, v in batch.items()}
  step = train.make_train_step(MM1(cfg), tx, schedule, shardings, bsh)
  return mesh, mesh_cfg, state, shardings, bsh, step


def _fixed_batch(cfg):
  rng = np.random.default_rng(0)
  batch = train.dummy_batch(8, 32, 2, cfg)
  q = cfg.tokens_per_image
  seq = rng.integers(5, 60, (8, 33)).astype(np.int32)
  seq[:, 1:1 + q] = cfg.image_token_id
  batch["tokens"], batch["targets"] = seq[:, :-1], seq[:, 1:]
  batch["loss_weights"] = (batch["targets"] != cfg.image_token_id).astype(np.float32)
  batch["positions"] = np.broadcast_to(np.arange(32), (8, 32)).astype(np.int32)
  batch["images"] = rng.integers(0, 256, batch["images"].shape).astype(np.uint8)
  return batch


def test_loss_falls_on_a_fixed_batch(tiny_config):
  mesh, mesh_cfg, state, _, bsh, step = _setup(tiny_config)
  batch = train.global_batch(_fixed_batch(tiny_config), bsh)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    for _ in range(15):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.6 * losses[0], losses
  assert float(metrics["learning_rate"]) > 0 and float(metrics["grad_norm"]) > 0


@pytest.mark.slow
def test_checkpoint_round_trip(tiny_config, tmp_path):
  mesh, mesh_cfg, state, shardings, bsh, step = _setup(tiny_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    state, _ = step(state, train.global_batch(_fixed_batch(tiny_config), bsh))
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1)
  assert ckpt.save(1, state, {"batches_consumed": 1})
  ckpt.wait()
  assert ckpt.latest_step() == 1
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  restored, data_state = ckpt.restore(1, abstract)
  assert data_state == {"batches_consumed": 1}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  params = ckpt.restore_params(1, abstract.params)
  np.testing.assert_array_equal(np.asarray(params["decoder"]["ln_final"]["scale"]),
                                np.asarray(state.params["decoder"]["ln_final"]["scale"]))
  ckpt.close()


@pytest.mark.slow
@pytest.mark.parametrize("conn", sorted(connector.CONNECTORS))
def test_flop_count_matches_xla_for_the_forward_pass(tiny_config, conn):
  """The MFU numerator against XLA's own count of the compiled forward pass.

  Unrolled layers: XLA's cost analysis counts a scanned (while-loop) body only once.
  """
  import dataclasses

  tiny_config = dataclasses.replace(
      tiny_config, encoder=dataclasses.replace(tiny_config.encoder, scan_layers=False),
      decoder=dataclasses.replace(tiny_config.decoder, scan_layers=False), connector=connector.CONNECTORS[conn]())
  m = MM1(tiny_config)
  batch = train.dummy_batch(2, 32, 2, tiny_config)
  args = (batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])
  params = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), *args))["params"]
  # The lowered (pre-optimisation) HLO: the CPU backend hides matmuls in library calls.
  lowered = jax.jit(lambda p: m.apply({"params": p}, *args)).lower(params)
  xla = lowered.cost_analysis()["flops"]
  ours = flops.forward_flops(params, tiny_config, flops.executed_work(2, 32, 2, tiny_config.decoder.attention_chunks))
  assert 0.8 < ours / xla < 1.25, (ours, xla)


# --- the command line ----------------------------------------------------------

SMALL = [
    "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=4", "--gin.LOG_EVERY=1", "--gin.CHECKPOINT_EVERY=2",
    "--gin.fewshot.FewShotConfig.num_queries=4", "--gin.fewshot.FewShotConfig.batch_size=4",
    "--gin.fewshot.FewShotConfig.shots=(0, 1)", "--gin.fewshot.FewShotConfig.max_new_tokens=4",
]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  return env


def _mm1_train(workdir, *extra, timeout=600):
  cmd = [sys.executable, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
         f"--workdir={workdir}", *SMALL, *extra]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_help():
  for name in ("train", "eval"):
    out = subprocess.run([sys.executable, "-m", "mm1_jax.cli", name, "--help"], capture_output=True,
                         text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 0 and "--gin_file" in out.stdout and "--gin.NAME=VALUE" in out.stdout


@pytest.mark.slow
def test_train_cli_end_to_end_and_resume(tmp_path):
  # A 5-step run, sliced: it stops (with a checkpoint) after 3 steps.
  out = _mm1_train(tmp_path, "--gin.TRAIN_STEPS=5", "--stop_after_steps=3")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "stopped at step 3" in out.stdout
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "images_per_s", "mfu"):
    assert np.isfinite(records[-1][key]), key
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "operative_config.gin").exists()
  ckpt = Checkpointer(tmp_path / "checkpoints")
  data_state = ckpt.restore_data(3)
  ckpt.close()
  assert data_state["batches_consumed"] == 3 and "next_index" in json.dumps(data_state["loader"])

  # The same command resumes at 3 (loader state included) and finishes.
  out = _mm1_train(tmp_path, "--gin.TRAIN_STEPS=5")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "resumed from" in out.stdout
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  for step in (0, 5):
    result = json.loads((tmp_path / "eval" / f"step_{step}.json").read_text())
    assert result["step"] == step
    assert {"shapes_caption/0shot/cider", "shapes_caption/1shot/cider", "shapes_vqa/0shot/accuracy",
            "shapes_vqa/1shot/accuracy"} <= set(result["results"])
  assert "| metric" in out.stdout and "step 0" in out.stdout and "step 5" in out.stdout

  # It saw exactly the batches of an uninterrupted run: the same losses, bit for bit.
  straight = tmp_path / "straight"
  out = _mm1_train(straight, "--gin.TRAIN_STEPS=5", "--gin.EVALUATION=None")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  want = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss"] for r in records] == [r["loss"] for r in want]


def test_each_host_keeps_its_loader_state_beside_the_checkpoint(tmp_path, tiny_config):
  """With several processes, host i's loader position is saved per step and restored."""
  import tasks  # noqa: F401
  from mm1_jax.data import pipeline

  cfg = tiny_config
  data = pipeline.DataConfig(batch_size=4, seq_len=64, max_images=2, seed=5)
  host = (1, 2)
  stream = train._DataStream(data, cfg, host, tmp_path, 0, 0, {})
  for _ in range(3):
    next(stream)
  assert stream.record() == {}  # not in the shared data record: one per host instead
  stream.saved(3, kept=[3])
  expected = [next(stream) for _ in range(2)]
  assert (tmp_path / "loader_state" / "step_3" / "host_1.json").exists()
  resumed = train._DataStream(data, cfg, host, tmp_path, 3, 3, {})
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
  # A later save drops the states of checkpoints that are gone.
  stream.saved(7, kept=[7])
  assert not (tmp_path / "loader_state" / "step_3").exists()


@pytest.mark.slow
def test_cli_trains_on_a_mixture_registered_in_a_user_module(tmp_path):
  """The tutorial in docs/data.md, as a user runs it: --module_import and MIXTURE_OR_TASK_NAME."""
  mods = tmp_path / "mods"
  mods.mkdir()
  (mods / "my_mixtures.py").write_text(
      "import seqio\nimport tasks\n"
      "seqio.MixtureRegistry.add('my_captions_and_text', "
      "[('mm1_shapes_caption', 3.0), ('mm1_shapes_text', 1.0)])\n")
  env = _env()
  env["PYTHONPATH"] = os.pathsep.join([str(mods), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
         f"--workdir={tmp_path / 'run'}", *SMALL, "--gin.TRAIN_STEPS=2", "--gin.EVALUATION=None",
         "--module_import=my_mixtures", "--gin.MIXTURE_OR_TASK_NAME='my_captions_and_text'",
         "--gin.MIXTURE_RATES=None"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert "my_captions_and_text" in (tmp_path / "run" / "operative_config.gin").read_text()
