"""The splash attention path (mm1_jax/splash.py), run by Pallas's interpreter on the CPU: the
same kernel the TPU compiles, checked against the einsum path under the dense mask it
replaces, without a mesh and sharded over the 8 simulated devices (tests/conftest.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import layers, model, sharding, splash, train

# T = 384: three 128-wide tiles (splash.tile), so the kernel skips the tiles above the
# diagonal, and accumulates over several key tiles forward and backward.
B, T, N, K, H = 4, 384, 4, 2, 64


def _segments():
  """Packed rows: two documents; three, across tiles; one then padding; two cut at a tile
  boundary."""
  seg = np.ones((B, T), np.int32)
  seg[0, 100:] = 2
  seg[1, 37:150], seg[1, 150:] = 2, 3
  seg[2, 200:] = 0
  seg[3, 128:] = 2
  return jnp.asarray(seg)


def _qkv(seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
          jax.random.normal(kv, (B, T, K, H)))


def _loss(attn, seg):
  real = (seg > 0)[..., None, None]  # padding rows differ by design and carry no loss

  def loss(q, k, v):
    out = attn(q, k, v)
    return jnp.sum(jnp.sin(out) * real), out * real
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize("window", [None, 60])
def test_splash_matches_the_dense_mask(window):
  # Fails if segments leak into each other, a causal edge is lost or added, padding is seen
  # by a real token, the window is off by one, or the GQA head grouping differs.
  seg = _segments()
  q, k, v = _qkv()
  mask = model.segment_causal_mask(seg, window)
  (lx, ox), gx = jax.jit(_loss(lambda q, k, v: layers.attend(q, k, v, mask), seg))(q, k, v)
  (ls, os_), gs = jax.jit(_loss(lambda q, k, v: splash.attend(q, k, v, seg, window), seg))(q, k, v)
  np.testing.assert_allclose(os_, ox, atol=2e-5)
  np.testing.assert_allclose(ls, lx, rtol=1e-5)
  for a, b in zip(gs, gx):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_splash_sharded_over_rows_and_heads():
  # data=2 x tensor=2: each device gets half the rows and one of the two key-value heads with
  # its two query heads. Fails if the shard_map's specs split heads apart from their group.
  seg = _segments()
  q, k, v = _qkv(1)
  mask = model.segment_causal_mask(seg)
  (_, want), gwant = jax.jit(_loss(lambda q, k, v: layers.attend(q, k, v, mask), seg))(q, k, v)
  mesh_cfg = sharding.MeshConfig(shape=(2, 1, 2, 1))
  fn = _loss(lambda q, k, v: splash.attend(q, k, v, seg), seg)
  with jax.set_mesh(sharding.make_mesh(mesh_cfg, jax.devices()[:4])), nn.logical_axis_rules(mesh_cfg.rules):
    compiled = jax.jit(fn).lower(q, k, v).compile()
    (_, got), ggot = compiled(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5)
  for a, b in zip(ggot, gwant):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_splash_refuses_what_it_cannot_do():
  q, k, v = _qkv()
  assert splash.tile(T) == 128 and splash.tile(1024) == 512
  with pytest.raises(ValueError, match="multiple of 128"):
    splash.attend(q[:, :200], k[:, :200], v[:, :200], _segments()[:, :200])
  mesh_cfg = sharding.MeshConfig(shape=(1, 1, 4, 1))  # 4 tensor devices, 2 key-value heads
  with jax.set_mesh(sharding.make_mesh(mesh_cfg, jax.devices()[:4])), nn.logical_axis_rules(mesh_cfg.rules):
    with pytest.raises(ValueError, match="whole heads"):
      jax.jit(lambda q, k, v: splash.attend(q, k, v, _segments())).lower(q, k, v)


def _packed_batch(config, seq_len=128):
  """Two rows: two documents, the first with an image; one document then padding."""
  rng = np.random.default_rng(0)
  b, q, d = 2, config.tokens_per_image, config.decoder
  tokens = rng.integers(1, d.vocab_size, (b, seq_len)).astype(np.int32)
  tokens[tokens == config.image_token_id] = 1
  tokens[0, 4:4 + q] = config.image_token_id
  seg = np.ones((b, seq_len), np.int32)
  seg[0, 70:], seg[1, 100:] = 2, 0
  positions = np.zeros_like(seg)
  for r in range(b):
    for s_id in np.unique(seg[r]):
      where = seg[r] == s_id
      positions[r, where] = np.arange(where.sum())
  batch = train.dummy_batch(b, seq_len, 1, config)
  s = config.encoder.image_size
  batch.update(tokens=tokens, targets=np.roll(tokens, -1, axis=1), segment_ids=seg, positions=positions,
               loss_weights=((seg > 0) & (tokens != config.image_token_id)).astype(np.float32),
               images=rng.normal(size=(b, 1, s, s, 3)).astype(np.float32))
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.slow
def test_mm1_loss_is_the_same_with_splash(tiny_config):
  # The whole model: packed rows with an image and padding, the loss and its gradients with
  # attention_impl="splash" against "xla". Fails if the decoder does not hand the segment
  # ids down to every layer (scanned), or the image tokens are attended otherwise.
  config = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, attention_chunks=1))
  batch = _packed_batch(config)
  results = {}
  for impl in ("xla", "splash"):
    cfg = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, attention_impl=impl))
    m = cfg.build()
    params = nn.unbox(jax.jit(m.init)(jax.random.key(0), *(batch[k] for k in ("tokens", "images", "segment_ids",
                                                                     "positions")))["params"])
    loss = lambda p: train._mm1_loss(p, model=m, batch=batch, z_loss=0.0)[0]  # noqa: E731, B023
    # The scanned layer's attention: a kernel call forward and one backward (a fallback to
    # the einsum path would make the comparison vacuous).
    calls = str(jax.make_jaxpr(jax.grad(loss))(params)).count("pallas_call")
    assert calls == (2 if impl == "splash" else 0), calls
    results[impl] = jax.jit(jax.value_and_grad(loss))(params)
  (lx, gx), (ls, gs) = results["xla"], results["splash"]
  np.testing.assert_allclose(ls, lx, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-7)
