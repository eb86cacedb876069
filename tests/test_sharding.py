"""Parameters and batches on an 8-device (data=2, fsdp=2, tensor=2) CPU mesh follow the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mm1_jax import optim, sharding, train
from mm1_jax.model import MM1


@pytest.fixture(scope="module")
def mesh_and_state():
  from conftest import tiny_model_config
  cfg = tiny_model_config()
  mesh_cfg = sharding.MeshConfig(shape=(2, 2, 2))
  mesh = sharding.make_mesh(mesh_cfg)
  tx, _ = optim.make_optimizer(optim.OptimizerConfig(), 10)
  batch = train.dummy_batch(8, 16, 2, cfg)
  state, shardings = train.init_train_state(MM1(cfg), tx, batch, jax.random.PRNGKey(0), mesh,
                                            mesh_cfg.rules)
  return cfg, mesh_cfg, mesh, state, shardings


def test_eight_devices_and_mesh_axes(mesh_and_state):
  _, _, mesh, _, _ = mesh_and_state
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
  assert sharding.MeshConfig(shape=(-1, 2, 1)).resolved_shape(8) == (4, 2, 1, 1)
  assert sharding.MeshConfig(shape=(1, -1, 1, 2)).resolved_shape(8) == (1, 4, 1, 2)
  # Multi-slice: the shape is per slice; data parallelism crosses the slices.
  two_slices = sharding.MeshConfig(shape=(1, -1, 2, 1), dcn_shape=(2, 1, 1, 1))
  assert two_slices.resolved_shape(16) == (1, 4, 2, 1)
  assert two_slices.global_shape(16) == {"data": 2, "fsdp": 4, "tensor": 2, "expert": 1}
  assert sharding.data_across_slices(1) is None and sharding.data_across_slices(4) == (4, 1, 1, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.MeshConfig(shape=(-1, -1, 1)).resolved_shape(8)
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.MeshConfig(shape=(3, 2, 2)).resolved_shape(8)


@pytest.mark.parametrize("path, spec", [
    # Scanned blocks: a leading, unsharded 'layers' axis.
    (("decoder", "blocks", "layers", "mlp", "gate", "kernel"), P(None, "fsdp", "tensor")),
    (("decoder", "blocks", "layers", "mlp", "down", "kernel"), P(None, "tensor", "fsdp")),
    (("decoder", "blocks", "layers", "attn", "query", "kernel"), P(None, "fsdp", "tensor", None)),
    (("decoder", "blocks", "layers", "attn", "out", "kernel"), P(None, "tensor", None, "fsdp")),
    (("decoder", "blocks", "layers", "ln_mlp", "scale"), P(None, "fsdp")),
    (("decoder", "embedding", "embedding"), P("tensor", "fsdp")),
    (("decoder", "ln_final", "scale"), P("fsdp")),
    (("encoder", "blocks", "layers", "mlp", "up", "kernel"), P(None, "fsdp", "tensor")),
    (("encoder", "patch_embed", "kernel"), P(None, "fsdp")),
    (("connector", "readout_1", "kernel"), P("tensor", "fsdp")),
    (("connector", "stage1_0", "conv1", "kernel"), P(None, None, "fsdp", "tensor")),
])
def test_parameter_shardings_follow_rules(mesh_and_state, path, spec):
  _, _, _, state, shardings = mesh_and_state
  leaf, leaf_sharding = state.params, shardings.params
  for key in path:
    leaf, leaf_sharding = leaf[key], leaf_sharding[key]
  assert leaf_sharding.spec == spec
  assert leaf.sharding.spec == spec  # the live array really is laid out so
  # Each device holds only its slice.
  shard_shape = leaf.addressable_shards[0].data.shape
  expected = tuple(d // (np.prod([2 for _ in ([a] if isinstance(a, str) else (a or []))]))
                   for d, a in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec))))
  assert shard_shape == expected


def test_optimizer_state_is_sharded_like_params(mesh_and_state):
  _, _, _, state, _ = mesh_and_state
  mu = state.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
  kernel = mu["decoder"]["blocks"]["layers"]["mlp"]["gate"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")


def test_batch_is_sharded_over_data_fsdp_and_expert(mesh_and_state):
  cfg, mesh_cfg, mesh, _, _ = mesh_and_state
  batch = train.dummy_batch(8, 16, 2, cfg)
  shardings = {k: sharding.batch_sharding(mesh, mesh_cfg.rules, v.ndim) for k, v in batch.items()}
  arrays = train.global_batch(batch, shardings)
  assert arrays["tokens"].sharding.spec == P(("data", "fsdp", "expert"), None)
  assert arrays["images"].sharding.spec == P(("data", "fsdp", "expert"), None, None, None, None)
  assert arrays["tokens"].addressable_shards[0].data.shape == (2, 16)  # 8 rows over 4 shards
  assert sharding.batch_divisor(mesh, mesh_cfg.rules) == 4


def test_sharded_train_step_runs_and_keeps_layout(mesh_and_state):
  cfg, mesh_cfg, mesh, state, shardings = mesh_and_state
  import flax.linen as nn
  tx, schedule = optim.make_optimizer(optim.OptimizerConfig(), 10)
  batch = train.dummy_batch(8, 16, 2, cfg)
  batch["targets"][:] = 7
  batch["loss_weights"][:] = 1.0
  bsh = {k: sharding.batch_sharding(mesh, mesh_cfg.rules, v.ndim) for k, v in batch.items()}
  step = train.make_train_step(MM1(cfg), tx, schedule, shardings, bsh)
  state = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    new_state, metrics = step(state, train.global_batch(batch, bsh))
  assert np.isfinite(float(metrics["loss"]))
  kernel = new_state.params["decoder"]["blocks"]["layers"]["mlp"]["gate"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert int(new_state.step) == 1


def _layout(cfg, mesh_shape, mesh_cfg=None):
  from mm1_jax import layout
  rows = layout.layout(cfg, mesh_shape, (mesh_cfg or sharding.MeshConfig()).rules)
  return {path: (shape, spec, note) for path, shape, spec, note in rows}


def test_encoder_and_decoder_rule_sets_are_separate():
  from conftest import tiny_model_config
  cfg = tiny_model_config()
  mesh = {"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}
  # The image tower replicated over fsdp, only tensor-parallel; the decoder keeps FSDP.
  enc_rules = (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"), ("heads", "tensor"),
               ("kv", None), ("length", None), ("patch", None), ("layers", None))
  rows = _layout(cfg, mesh, sharding.MeshConfig(encoder_rules=enc_rules))
  assert rows["encoder/blocks/layers/mlp/up/kernel"][1] == "P(None, None, 'tensor')"
  assert rows["connector/readout_1/kernel"][1] == "P('tensor', None)"
  assert rows["decoder/blocks/layers/mlp/up/kernel"][1] == "P(None, 'fsdp', 'tensor')"
  # Without encoder rules both follow the decoder's.
  rows = _layout(cfg, mesh, sharding.MeshConfig(encoder_rules=None))
  assert rows["encoder/blocks/layers/mlp/up/kernel"][1] == "P(None, 'fsdp', 'tensor')"


def test_expert_axis_shards_experts_and_indivisible_dims_stay_whole():
  import dataclasses

  from conftest import tiny_model_config
  from mm1_jax import moe
  cfg = tiny_model_config()
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(
      cfg.decoder, moe=moe.MoEConfig(num_experts=4, top_k=2, every=2, expert_mlp_dim=96)))
  rows = _layout(cfg, {"fsdp": 2, "tensor": 2, "expert": 2})
  up = [v for k, v in rows.items() if k.endswith("experts_up") or k.endswith("up") and "sparse" in k]
  assert up and all(spec.startswith("P(None, 'expert', 'fsdp'") for _, spec, _ in up), up
  # 64-wide embed over fsdp=3 does not divide: left whole, with a note.
  spec, notes = sharding.resolve_spec((64, 128), ("embed", "mlp"), sharding.MeshConfig().rules,
                                      {"data": 1, "fsdp": 3, "tensor": 2, "expert": 1})
  assert spec == P(None, "tensor") and notes == ["embed=64 not divisible by fsdp=3"]


@pytest.mark.parametrize("model_name, mesh_name, mesh_shape", __import__("mm1_jax.layout").layout.GOLDEN)
def test_parameter_layouts_match_golden_files(model_name, mesh_name, mesh_shape):
  from mm1_jax import layout
  path = layout.golden_path(model_name, mesh_name)
  current = layout.golden_text(model_name, mesh_shape)
  assert path.exists(), f"missing {path}: python -m mm1_jax.layout --write"
  assert current == path.read_text(), (
      f"the layout of {model_name} on {mesh_name} changed; review the diff and run "
      "`python -m mm1_jax.layout --write`")
