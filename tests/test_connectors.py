"""Every connector in `connector.CONNECTORS`, through one set of tests.

A new connector needs no edit here: its class, its gin file and its entry are enough.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import connector, gin_files, model
from conftest import init_apply, jitted

NAMES = sorted(connector.CONNECTORS)
GIN_DIR = gin_files.root() / "gin" / "connectors"
REPO = Path(__file__).resolve().parent.parent


def test_every_connector_has_a_gin_file_and_every_gin_file_a_connector():
  assert {p.stem for p in GIN_DIR.glob("*.gin")} == set(NAMES)


def test_every_connector_is_documented():
  text = (REPO / "docs" / "models.md").read_text()
  missing = [n for n in NAMES if f"gin/connectors/{n}.gin" not in text]
  assert not missing, f"docs/models.md does not list {missing}"


@pytest.mark.slow
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
  _, out = init_apply(cfg.connector.build(out_dim=8), feats)
  assert out.shape[1] == cfg.tokens_per_image


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_each_image_on_its_own(name):
  cfg = connector.CONNECTORS[name]()
  feats = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 32))
  variables, out = init_apply(cfg.build(out_dim=24), feats)
  assert out.shape == (3, cfg.tokens(16), 24)  # the count the decoder lays sequences out for
  # Each image's tokens depend on that image only.
  out2 = jitted(cfg.build(out_dim=24))(variables, feats.at[1].set(0.0))
  np.testing.assert_allclose(out[0], out2[0], atol=1e-6)
  assert np.abs(np.asarray(out[1] - out2[1])).max() > 1e-4


_TENSOR = re.compile(r"tensor<([0-9x]+)x[a-z]+[0-9]*>")


def _dims(type_text: str) -> list[int]:
  return [int(d) for d in type_text.split("x")]


def matmul_flops(stablehlo: str) -> float:
  """FLOPs (2 per multiply-add) of every dot_general and convolution in a StableHLO module,
  read from the ops' own operand and result types: what the compiled program multiplies."""
  total = 0.0
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" in line:
      lhs, *_, out = _TENSOR.findall(line)
      contracting = re.search(r"contracting_dims = \[([0-9, ]*)\]", line).group(1)
      k = math.prod(_dims(lhs)[int(i)] for i in contracting.split(",") if i.strip())
      total += 2.0 * math.prod(_dims(out)) * k
    elif "stablehlo.convolution" in line:
      assert "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]" in line, line  # flax's NHWC / HWIO
      _, kernel, out = _TENSOR.findall(line)[:3]
      kh, kw, cin_per_group, _ = _dims(kernel)
      total += 2.0 * math.prod(_dims(out)) * kh * kw * cin_per_group
  return total


# Each connector at its defaults, and the C-Abstractor also with two blocks a stage and a
# hidden width equal to the encoder's (no shortcut projection): every branch of its count.
FLOP_CASES = [(n, {}) for n in NAMES] + [("c_abstractor", {"depth": 2, "hidden": 64})]


@pytest.mark.parametrize("name, overrides", FLOP_CASES)
def test_forward_flops_match_the_programs_matmuls(name, overrides):
  """`forward_flops` (the MFU numerator's share) against the dot and convolution FLOPs of
  the lowered module, counted from its ops' shapes. The only work left out on purpose is
  the squeeze-excite's per-image matmuls (under 1 %); any missing layer, pool or attention
  term is more than the margin at these sizes."""
  cfg = dataclasses.replace(connector.CONNECTORS[name](), **overrides)
  patches, width, out_dim, batch = 64, 64, 48, 2
  module = cfg.build(out_dim=out_dim)
  feats = jax.ShapeDtypeStruct((batch, patches, width), jnp.float32)
  params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.PRNGKey(0), jnp.ones(feats.shape))))
  program = matmul_flops(jax.jit(module.apply).lower(params, feats).as_text())
  ours = batch * cfg.forward_flops(patches, width, out_dim)
  assert ours == pytest.approx(program, rel=0.01), (ours, program)


def test_matmul_counter_reads_dots_and_grouped_convolutions():
  x = jax.ShapeDtypeStruct((2, 4, 4, 8), jnp.float32)
  dense = nn.Conv(16, (3, 3), padding="SAME")
  depthwise = nn.Conv(8, (3, 3), padding="SAME", feature_group_count=8)
  for conv, per_output in ((dense, 3 * 3 * 8), (depthwise, 3 * 3 * 1)):
    p = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(conv.apply, p, x)
    assert matmul_flops(jax.jit(conv.apply).lower(p, x).as_text()) == 2 * math.prod(out.shape) * per_output
  a, b = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32), jax.ShapeDtypeStruct((3, 7, 2), jnp.float32)
  assert matmul_flops(jax.jit(jnp.matmul).lower(a, b).as_text()) == 2 * 3 * 5 * 2 * 7


def test_pixel_shuffle_puts_neighbouring_patches_side_by_side():
  """Token (i, j) holds the r x r block of patches at rows r*i.., columns r*j.. of the grid,
  row by row: checked through the first Linear with an identity kernel and no LayerNorm scaling."""
  cfg = connector.PixelShuffleConfig(factor=2)
  n, d = 4, 2  # a 4 x 4 grid of 2-channel patches
  # Distinct values in no order, so that a token's sorted order pins down which patches
  # (and channels) it holds.
  feats = jnp.asarray(np.random.default_rng(0).permutation(n * n * d), jnp.float32).reshape(1, n * n, d)
  module = cfg.build(out_dim=4 * d)
  variables = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), feats))
  captured = {}

  def take_hidden_input(next_fun, args, kwargs, context):
    if context.module.name == "hidden" and context.method_name == "__call__":
      captured["x"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(take_hidden_input):
    module.apply(variables, feats)
  grid = np.asarray(feats).reshape(n, n, d)
  for i in range(2):
    for j in range(2):
      block = grid[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1)  # (r0c0, r0c1, r1c0, r1c1) x channels
      token = np.asarray(captured["x"][0, 2 * i + j])
      # LayerNorm is monotone per token: the order of values, hence the layout, survives it.
      np.testing.assert_array_equal(np.argsort(token), np.argsort(block))


def test_pixel_shuffle_refuses_a_grid_it_cannot_split():
  with pytest.raises(ValueError, match="factor 2"):
    connector.PixelShuffleConfig(factor=2).tokens(27 * 27)  # ViT-H/14 at 378 px
  assert connector.PixelShuffleConfig(factor=3).tokens(27 * 27) == 81


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_mm1_runs_with_each_connector(tiny_config, name):
  cfg = dataclasses.replace(tiny_config, connector=connector.CONNECTORS[name]())
  m = model.MM1(cfg)
  q = cfg.tokens_per_image
  tokens = jnp.concatenate([jnp.full((2, q), 3), jnp.full((2, 6), 9)], axis=1).astype(jnp.int32)
  images = jnp.zeros((2, 1, 64, 64, 3), jnp.uint8)
  seg = jnp.ones_like(tokens)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  _, logits = init_apply(m, tokens, images, seg, pos)
  assert logits.shape == (2, q + 6, cfg.decoder.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
