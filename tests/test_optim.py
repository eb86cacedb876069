"""Weight decay reaches every weight matrix of every preset, and nothing else; per-component
learning-rate multipliers and freezing."""

import math
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import optim

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p for p in (REPO / "gin" / "models").glob("*.gin") if not p.stem.endswith("_base"))
TABLES = ("pos_embed", "queries", "cls")  # learned tables added to or attended by activations
NOT_MATRICES = ("bias", "scale")


def _boxed_params(model_file: Path):
  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(REPO))
  gin.parse_config_files_and_bindings([str(model_file.relative_to(REPO))], [])
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  gin.clear_config(clear_constants=True)
  s = config.encoder.image_size
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  images = jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.uint8)
  return jax.eval_shape(config.build().init, jax.random.PRNGKey(0), tokens, images, tokens, tokens)["params"]


@pytest.mark.slow
@pytest.mark.parametrize("model_file", PRESETS, ids=[p.stem for p in PRESETS])
def test_decay_mask_by_rank(model_file):
  """Catches a matrix the mask does not know by name (the MoE experts' `gate`/`up`/`down`
  were once left undecayed: 61B of MM1-3B-MoE's 64B parameters): every leaf whose rank
  without the stacked-layer axis is 2 or more is decayed unless it is a bias or a position /
  query table; norm scales, biases and tables are not."""
  boxed = _boxed_params(model_file)
  mask = optim._decay_mask(boxed)
  decayed = total = 0
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  for (path, leaf), decays in zip(jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0],
                                  jax.tree.leaves(mask)):
    name = path[-1].key
    names = leaf.names if is_box(leaf) else (None,) * len(leaf.shape)
    rank = sum(1 for axis in names if axis != "layers")
    expected = rank >= 2 and name not in TABLES + NOT_MATRICES
    assert decays == expected, (jax.tree_util.keystr(path), names, decays)
    size = math.prod((leaf.value if is_box(leaf) else leaf).shape)
    total += size
    decayed += size * decays
  assert decayed / total > 0.98, decayed / total  # matrices are nearly all of any model


def test_moe_experts_are_decayed_by_the_optimizer():
  """Catches a mask that is right but not applied: one AdamW step with zero gradients
  shrinks an expert matrix by lr x decay, and leaves a norm scale alone."""
  params = {"moe": {"gate": jnp.ones((2, 3, 4)), "router": jnp.ones((3, 2))}, "ln": {"scale": jnp.ones((3,))}}
  tx, schedule = optim.make_optimizer(optim.OptimizerConfig(peak_lr=0.1, warmup_steps=0, weight_decay=0.5), 10)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  lr = float(schedule(0))
  assert float(new["moe"]["gate"][0, 0, 0]) == pytest.approx(1 - lr * 0.5)
  assert float(new["moe"]["router"][0, 0]) == pytest.approx(1 - lr * 0.5)
  assert float(new["ln"]["scale"][0]) == pytest.approx(1.0)


def _step(config, params, grads):
  tx, schedule = optim.make_optimizer(config, 10)
  updates, state = tx.update(grads, tx.init(params), params)
  return updates, state, float(schedule(0))


def test_lr_multiplier_scales_one_component():
  """Catches a multiplier applied to the wrong subtree or not at all: Adam's first step
  moves every weight by lr x sign(g), so equal gradients give the encoder 0.1 of the
  decoder's step."""
  params = {"encoder": {"w": {"kernel": jnp.ones((2, 2))}}, "decoder": {"w": {"kernel": jnp.ones((2, 2))}}}
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  config = optim.OptimizerConfig(peak_lr=0.1, warmup_steps=0, weight_decay=0.0,
                                 lr_multipliers={"encoder": 0.1})
  updates, _, lr = _step(config, params, grads)
  assert lr > 0
  np.testing.assert_allclose(updates["decoder"]["w"]["kernel"], -lr, rtol=1e-4)
  np.testing.assert_allclose(updates["encoder"]["w"]["kernel"], -0.1 * lr, rtol=1e-4)


def test_frozen_component_keeps_no_state_and_leaves_the_clip():
  """Catches a frozen encoder that still moves, still holds Adam moments, or whose
  gradient still counts in the global-norm clip (a huge encoder gradient would then
  shrink the decoder's step)."""
  params = {"encoder": {"w": {"kernel": jnp.ones((64, 64))}}, "decoder": {"w": {"kernel": jnp.ones((2, 2))}}}
  grads = {"encoder": {"w": {"kernel": 1e3 * jnp.ones((64, 64))}},
           "decoder": {"w": {"kernel": jnp.full((2, 2), 0.1)}}}
  base = dict(peak_lr=0.1, warmup_steps=0, weight_decay=0.1, clip_norm=1.0, b1=0.0, b2=0.0)
  frozen, state, _ = _step(optim.OptimizerConfig(**base, lr_multipliers={"encoder": 0.0}), params, grads)
  assert not np.any(frozen["encoder"]["w"]["kernel"])
  assert max(x.size for x in jax.tree.leaves(state)) < 64 * 64  # no moments of the encoder
  # The same decoder alone, without the encoder: the decoder's step must not change.
  alone, _, _ = _step(optim.OptimizerConfig(**base), {"decoder": params["decoder"]},
                      {"decoder": grads["decoder"]})
  np.testing.assert_allclose(frozen["decoder"]["w"]["kernel"], alone["decoder"]["w"]["kernel"], rtol=1e-6)


def test_lr_multiplier_names_must_be_components():
  params = {"encoder": {"w": {"kernel": jnp.ones((2, 2))}}}
  tx, _ = optim.make_optimizer(optim.OptimizerConfig(lr_multipliers={"vision": 0.0}), 10)
  with pytest.raises(ValueError, match="vision"):
    tx.init(params)


@pytest.mark.parametrize("multipliers", [{"encoder": 0.1}, {"encoder": 0.0, "connector": 0.5}])
def test_per_component_state_shards_and_checkpoints_like_the_params(multipliers, tiny_config, tmp_path):
  """The optimizer state of per-component rates holds MaskedNodes where a transform skips
  another component's parameters. Its shardings must have the same structure, or a resumed run
  (which builds its restore target from state and shardings) and mm1-aot stop with a pytree
  error; and the state must survive a checkpoint."""
  from mm1_jax import sharding, train
  from mm1_jax.checkpoint import Checkpointer

  tx, _ = optim.make_optimizer(optim.OptimizerConfig(lr_multipliers=multipliers), 10)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  state, shardings = train.init_train_state(tiny_config.build(), tx, train.dummy_batch(2, 32, 1, tiny_config),
                                            jax.random.PRNGKey(0), mesh, sharding.DECODER_RULES)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1)
  ckpt.save(1, state, {"batches_consumed": 1}, force=True)
  ckpt.wait()
  restored, _ = ckpt.restore(1, abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
