"""benchmarks/token_probe.py: the sown keys and inputs, the cell labels and the probe."""

import dataclasses

import jax
import numpy as np
import pytest

from benchmarks import attention_lookup as al
from benchmarks import token_probe as tp
from mm1_jax import decoder as decoder_lib
from mm1_jax import layers
from mm1_jax.data import shapes_world as sw
from mm1_jax.model import MM1


@pytest.mark.parametrize("scan", [True, False])
def test_sown_keys_are_the_keys_the_cache_holds_and_inputs_are_each_layers(tiny_config, scan):
  """Catches keys sown before RoPE (the cache holds them after), from another layer or with the
  head and position axes swapped, and inputs of the wrong width or layer count."""
  tiny_config = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, scan_layers=scan))
  model, c = MM1(tiny_config), tiny_config.decoder
  b, p = 2, 16
  tokens = np.full((b, p), 7, np.int32)
  tokens[:, 1:1 + tiny_config.tokens_per_image] = tiny_config.image_token_id
  tokens[:, 8:] = np.arange(8, p)  # distinct text tokens: distinct keys
  valid = np.ones((b, p), bool)
  images = np.random.default_rng(0).integers(0, 256, (b, 1, 64, 64, 3), dtype=np.uint8)
  params = model.init(jax.random.key(0), tokens, images, valid, decoder_lib.init_cache(c, b, p),
                      method=MM1.prefill)["params"]
  (_, cache), state = model.apply({"params": params}, tokens, images, valid, decoder_lib.init_cache(c, b, p),
                                  method=MM1.prefill, mutable=[layers.PROBS_COLLECTION])
  keys, inputs = al.decoder_sown(state, "keys"), al.decoder_sown(state, "inputs")
  assert len(keys) == len(inputs) == c.depth
  cached = [cache[0][i] for i in range(c.depth)] if scan else [kv[0] for kv in cache]
  for k, ck, x in zip(keys, cached, inputs):
    assert k.shape == (b, p, c.num_kv_heads, c.head_dim) and x.shape == (b, p, c.width)
    np.testing.assert_allclose(k.transpose(0, 2, 1, 3), np.asarray(ck), rtol=1e-5, atol=1e-6)
  assert not np.allclose(keys[0], keys[1])  # two layers, not one twice


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
  """Catches a probe that is scored on its training cells, standardised with the test cells'
  statistics or whose majority baseline is not the training cells' most common class: the class
  sits in one of 32 noisy features, scaled far from the others; random labels stay near chance."""
  rng = np.random.default_rng(0)
  n, d = 600, 32
  y = rng.integers(0, 3, n)
  x = rng.normal(size=(n, d))
  x[:, 5] = 100.0 + 10.0 * y + rng.normal(scale=0.5, size=n)
  r = tp.fit_probe(x[:400], y[:400], x[400:], y[400:], 3)
  assert r["accuracy"] > 0.95 and r["se"] <= np.sqrt(0.05 * 0.95 / 200)
  assert r["majority"] == pytest.approx((y[400:] == np.bincount(y[:400]).argmax()).mean(), abs=1e-4)
  noise = tp.fit_probe(x[:400], rng.integers(0, 3, 400), x[400:], y[400:], 3)
  assert noise["accuracy"] < 0.5


def test_variance_share_is_the_between_class_part_of_the_raw_variance():
  """Two classes at -1 and +1 in one feature, and a second feature of variance 3 that ignores them:
  the classes hold 1 / (1 + 3) of the variance; standardising would have hidden the difference."""
  y = np.repeat([0, 1], 4)
  x = np.stack([np.where(y == 0, -1.0, 1.0), np.sqrt(3.0) * np.tile([1.0, -1.0], 4)], 1)
  assert tp.variance_share(x, y) == pytest.approx(0.25)
  assert tp.variance_share(x[:, ::-1] * [1.0, 0.0], y) == pytest.approx(0.0, abs=1e-12)
