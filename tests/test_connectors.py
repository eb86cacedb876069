"""Every connector in `connector.CONNECTORS`, through one set of tests.

A new connector needs no edit here: its class, its gin file and its entry are enough.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import connector, gin_files, model

NAMES = sorted(connector.CONNECTORS)
GIN_DIR = gin_files.root() / "gin" / "connectors"
REPO = Path(__file__).resolve().parent.parent


def _init_apply(module, *args):
  variables = nn.meta.unbox(module.init(jax.random.PRNGKey(0), *args))
  return variables, module.apply(variables, *args)


def test_every_connector_has_a_gin_file_and_every_gin_file_a_connector():
  assert {p.stem for p in GIN_DIR.glob("*.gin")} == set(NAMES)


def test_every_connector_is_documented():
  text = (REPO / "docs" / "models.md").read_text()
  missing = [n for n in NAMES if f"gin/connectors/{n}.gin" not in text]
  assert not missing, f"docs/models.md does not list {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_gin_file_swaps_the_connector(name):
  gin.clear_config(clear_constants=True)
  try:
    for path in gin_files.search_paths():
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(["gin/models/mm1_tiny.gin", f"gin/connectors/{name}.gin"],
                                        ["IMAGE_TOKENS = 16"])
    cfg = gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)
  assert type(cfg.connector) is connector.CONNECTORS[name]
  # The token count the decoder's sequences are laid out for is what the module gives.
  feats = jnp.ones((1, cfg.encoder.num_patches, cfg.encoder.width))
  _, out = _init_apply(cfg.connector.build(out_dim=8), feats)
  assert out.shape[1] == cfg.tokens_per_image


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_each_image_on_its_own(name):
  cfg = connector.CONNECTORS[name]()
  feats = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 32))
  variables, out = _init_apply(cfg.build(out_dim=24), feats)
  assert out.shape == (3, cfg.tokens(16), 24)  # the count the decoder lays sequences out for
  # Each image's tokens depend on that image only.
  out2 = cfg.build(out_dim=24).apply(variables, feats.at[1].set(0.0))
  np.testing.assert_allclose(out[0], out2[0], atol=1e-6)
  assert np.abs(np.asarray(out[1] - out2[1])).max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_forward_flops_match_xla(name):
  """`forward_flops` (the MFU numerator's share) against XLA's count of the module alone.

  XLA also counts elementwise work (norms, activations, bias adds) that forward_flops
  leaves out, so ours is a little under; a missing layer is far more than the margin."""
  cfg = connector.CONNECTORS[name]()
  patches, width, out_dim, batch = 64, 256, 256, 2
  feats = jnp.ones((batch, patches, width))
  module = cfg.build(out_dim=out_dim)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), feats))
  # The lowered (pre-optimisation) HLO: the CPU backend hides matmuls in library calls.
  xla = jax.jit(module.apply).lower(params, feats).cost_analysis()["flops"]
  ours = batch * cfg.forward_flops(patches, width, out_dim)
  assert 0.9 < ours / xla <= 1.0, (ours, xla)


@pytest.mark.parametrize("name", NAMES)
def test_mm1_runs_with_each_connector(tiny_config, name):
  cfg = dataclasses.replace(tiny_config, connector=connector.CONNECTORS[name]())
  m = model.MM1(cfg)
  q = cfg.tokens_per_image
  tokens = jnp.concatenate([jnp.full((2, q), 3), jnp.full((2, 6), 9)], axis=1).astype(jnp.int32)
  images = jnp.zeros((2, 1, 64, 64, 3), jnp.uint8)
  seg = jnp.ones_like(tokens)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  _, logits = _init_apply(m, tokens, images, seg, pos)
  assert logits.shape == (2, q + 6, cfg.decoder.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
