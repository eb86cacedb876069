"""Weight decay reaches every weight matrix of every preset, and nothing else."""

import math
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
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
