"""benchmarks/token_probe.py: the sown keys and inputs, the cell labels and the probe."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention_lookup as al
from benchmarks import token_probe as tp
from mm1_jax import decoder as decoder_lib
from mm1_jax import layers
from mm1_jax.data import shapes_world as sw
from mm1_jax.model import MM1
from conftest import init_apply, jitted


@pytest.mark.parametrize("scan", [True, False])
def test_sown_keys_are_the_keys_the_cache_holds_and_inputs_are_each_layers(tiny_config, scan):
  """Catches keys sown before RoPE (the cache holds them after), from another layer or with the
  head and position axes swapped, and inputs that are not what each layer's own key projection
  reads (another layer's, the residual before its norm, the attention's output)."""
  tiny_config = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, scan_layers=scan))
  model, c = MM1(tiny_config), tiny_config.decoder
  b, p = 2, 16
  tokens = np.full((b, p), 7, np.int32)
  tokens[:, 1:1 + tiny_config.tokens_per_image] = tiny_config.image_token_id
  tokens[:, 8:] = np.arange(8, p)  # distinct text tokens: distinct keys
  valid = np.ones((b, p), bool)
  images = np.random.default_rng(0).integers(0, 256, (b, 1, 64, 64, 3), dtype=np.uint8)
  variables, _ = init_apply(model, tokens, images, valid, decoder_lib.init_cache(c, b, p), method=MM1.prefill)
  params = variables["params"]
  (_, cache), state = jitted(model, method=MM1.prefill, mutable=[layers.PROBS_COLLECTION])(
      variables, tokens, images, valid, decoder_lib.init_cache(c, b, p))
  keys, inputs = al.decoder_sown(state, "keys"), al.decoder_sown(state, "inputs")
  assert len(keys) == len(inputs) == c.depth
  cached = [cache[0][i] for i in range(c.depth)] if scan else [kv[0] for kv in cache]
  blocks = params["decoder"]["blocks"]
  kernels = ([blocks["layers"]["attn"]["key"]["kernel"][i] for i in range(c.depth)] if scan
             else [blocks[f"block_{i}"]["attn"]["key"]["kernel"] for i in range(c.depth)])
  positions = np.broadcast_to(np.arange(p), (b, p))
  for k, ck, x, w in zip(keys, cached, inputs, kernels):
    assert k.shape == (b, p, c.num_kv_heads, c.head_dim) and x.shape == (b, p, c.width)
    np.testing.assert_allclose(k.transpose(0, 2, 1, 3), np.asarray(ck), rtol=1e-5, atol=1e-6)
    # Each layer's inputs are what its own key projection and RoPE turned into its keys.
    own = layers.apply_rope(jnp.einsum("btd,dkh->btkh", x, w), positions, c.rope_base)
    np.testing.assert_allclose(k, np.asarray(own), rtol=1e-4, atol=1e-5)
  assert not np.allclose(keys[0], keys[1]) and not np.allclose(inputs[0], inputs[1])  # two layers, not one twice


def test_cell_labels_name_the_owning_shapes_kind_and_colour():
  square = sw.Shape("square", "red", "large", x=48, y=16, r=15)
  triangle = sw.Shape("triangle", "blue", "large", x=16, y=48, r=15)
  y = tp.cell_labels([triangle, square], 64, 4)
  assert sorted(np.flatnonzero(y["kind"] == sw.SHAPES.index("square"))) == [2, 3, 6, 7]
  assert set(y["colour"][[2, 3, 6, 7]]) == {list(sw.COLOURS).index("red")}
  assert set(y["kind"][y["colour"] == list(sw.COLOURS).index("blue")]) == {sw.SHAPES.index("triangle")}
  assert y["kind"][0] == y["colour"][0] == -1  # top-left: background
  np.testing.assert_array_equal(y["kind"] < 0, y["colour"] < 0)


def test_the_probe_reads_a_linear_feature_and_not_noise():
  """Catches a probe scored on its training cells (random labels in 300 dimensions are fitted on
  400 cells, not on new ones), standardised with the test cells' statistics (the test cells are
  all of the class at one end of the feature: centred on themselves they would read as the middle
  class) and a majority baseline that is not the training cells' commonest class."""
  rng = np.random.default_rng(0)
  y_train = np.repeat([0, 1, 2], [100, 250, 50])  # class 1 commonest
  y_test = np.full(60, 2)
  d = 32
  feature = lambda y: 10.0 * y + rng.normal(scale=0.5, size=len(y))  # noqa: E731
  x_train = rng.normal(size=(len(y_train), d))
  x_train[:, 5] = 100.0 + feature(y_train)
  x_test = rng.normal(size=(len(y_test), d))
  x_test[:, 5] = 100.0 + feature(y_test)
  r = tp.fit_probe(x_train, y_train, x_test, y_test, 3)
  assert r["accuracy"] > 0.95
  assert r["majority"] == 0.0  # class 1 never occurs among the test cells
  n = 400
  x, y = rng.normal(size=(n + 200, 300)), rng.integers(0, 3, n + 200)
  noise = tp.fit_probe(x[:n], y[:n], x[n:], y[n:], 3)
  fitted = tp.fit_probe(x[:n], y[:n], x[:n], y[:n], 3)
  assert noise["accuracy"] < 0.45 < 0.9 < fitted["accuracy"]  # the check above can tell the two apart


def test_variance_share_is_the_between_class_part_of_the_raw_variance():
  """One feature: 6 cells at 0 (class 0) and 2 at 4 (class 1), mean 1, between-class variance
  (6 * 1 + 2 * 9) / 8 = 3; a second feature of variance 1 that ignores the classes: the classes hold
  3 / (3 + 1) of the variance. Unweighted class means, or standardised features, give other values."""
  y = np.repeat([0, 1], [6, 2])
  x = np.stack([np.where(y == 0, 0.0, 4.0), np.tile([1.0, -1.0], 4)], 1)
  assert tp.variance_share(x, y) == pytest.approx(0.75)
  assert tp.variance_share(x * [0.0, 1.0], y) == pytest.approx(0.0, abs=1e-12)
