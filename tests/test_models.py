"""Shapes and behaviour of every module: ViT, C-Abstractor, decoder, MM1."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import connector, decoder, layers, model, vit
from conftest import init_apply, jitted


def test_vit_output_shape_and_uint8_input(tiny_config):
  enc = vit.ViT(tiny_config.encoder)
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
  variables, out = init_apply(enc, images)
  assert out.shape == (3, tiny_config.encoder.num_patches, tiny_config.encoder.width)
  # uint8 and the same pixels as float in [0, 1] are the same input.
  out_f = jitted(enc)(variables, images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(out, out_f, atol=1e-5)


def test_vit_with_cls_drops_it():
  cfg = vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                      use_cls=True)
  _, out = init_apply(vit.ViT(cfg), jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 16, 32)


def test_vit_rejects_wrong_resolution(tiny_config):
  with pytest.raises(ValueError, match="64px"):
    vit.ViT(tiny_config.encoder).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_adaptive_pool_matches_reference_bins():
  # 5 -> 3 bins as torch's adaptive pool: [0,2), [1,4), [3,5).
  m = connector.adaptive_pool_matrix(5, 3)
  np.testing.assert_allclose(m.sum(1), 1.0)
  np.testing.assert_allclose(m[0], [0.5, 0.5, 0, 0, 0])
  np.testing.assert_allclose(m[1], [0, 1 / 3, 1 / 3, 1 / 3, 0])
  np.testing.assert_allclose(m[2], [0, 0, 0, 0.5, 0.5])
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  pooled = connector.adaptive_avg_pool2d(x, 2)
  np.testing.assert_allclose(pooled, x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)))


@pytest.mark.slow
def test_regnet_block_shapes_and_shortcut():
  x = jnp.ones((2, 4, 4, 8))
  variables, y = init_apply(connector.RegNetBlock(16), x)
  assert y.shape == (2, 4, 4, 16)
  assert "shortcut" in variables["params"]  # 1x1 conv when channels change
  variables, y = init_apply(connector.RegNetBlock(8), x)
  assert "shortcut" not in variables["params"]
  assert variables["params"]["se_reduce"]["kernel"].shape == (8, 2)  # se ratio 0.25 of input


@pytest.mark.slow
def test_c_abstractor_output_tokens(tiny_config):
  cfg = connector.CAbstractorConfig(num_tokens=9, hidden=32, depth=2)
  variables, y = init_apply(connector.CAbstractor(cfg, out_dim=48), jnp.ones((2, 36, 24)))
  assert y.shape == (2, 9, 48)
  assert set(variables["params"]) >= {"pos_embed", "stage1_0", "stage1_1", "stage2_0", "stage2_1",
                                      "readout_1", "readout_2"}
  with pytest.raises(ValueError, match="square"):
    connector.CAbstractor(cfg, out_dim=48).init(jax.random.PRNGKey(0), jnp.ones((2, 35, 24)))


def test_decoder_shapes_and_gqa(tiny_config):
  dec = decoder.Decoder(tiny_config.decoder)
  x = jnp.ones((2, 10, tiny_config.decoder.width))
  mask = model.segment_causal_mask(jnp.ones((2, 10), jnp.int32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  variables = jax.jit(dec.init)(jax.random.PRNGKey(0), x, mask, pos)
  (logits, cache) = dec.apply(variables, x, mask, pos)
  assert logits.shape == (2, 10, tiny_config.decoder.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  kernel = nn.meta.unbox(variables)["params"]["blocks"]["layers"]["attn"]["key"]["kernel"]
  assert kernel.shape == (tiny_config.decoder.depth, tiny_config.decoder.width,
                          tiny_config.decoder.num_kv_heads, tiny_config.decoder.head_dim)


def test_rope_is_relative():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  dot = lambda a, b: float((layers.apply_rope(q, jnp.array([[a]])) *  # noqa: E731
                            layers.apply_rope(k, jnp.array([[b]]))).sum())
  assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-4)
  assert dot(3, 1) != pytest.approx(dot(3, 2), rel=1e-3)


def test_splice_puts_image_tokens_in_order():
  text = jnp.zeros((1, 6, 2))
  image = jnp.asarray([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
  is_img = jnp.asarray([[False, True, True, False, True, False]])
  out = model.splice_images(text, image, is_img)
  np.testing.assert_allclose(out[0, :, 0], [0, 1, 2, 0, 3, 0])


def test_segment_mask_blocks_other_segments_and_padding():
  seg = jnp.asarray([[1, 1, 2, 2, 0]])
  m = np.asarray(model.segment_causal_mask(seg))[0, 0]
  assert m[1, 0] and not m[0, 1]  # causal
  assert not m[2, 1] and m[3, 2]  # no attention across packed examples
  assert not m[3, 4] and m[4, 4] and not m[4, 0]  # padding attends only to itself


def _mm1_inputs(cfg, b=2, t=24, n=2, seed=0):
  rng = np.random.default_rng(seed)
  q = cfg.tokens_per_image
  tokens = rng.integers(5, cfg.decoder.vocab_size, (b, t)).astype(np.int32)
  tokens[:, 2:2 + q] = cfg.image_token_id
  tokens[0, 10:10 + q] = cfg.image_token_id
  images = rng.integers(0, 256, (b, n, 64, 64, 3)).astype(np.uint8)
  seg = np.ones((b, t), np.int32)
  pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  return tokens, images, seg, pos


@pytest.mark.slow
def test_mm1_forward_shape_and_image_dependence(tiny_config):
  m = model.MM1(tiny_config)
  tokens, images, seg, pos = _mm1_inputs(tiny_config)
  variables, logits = init_apply(m, tokens, images, seg, pos)
  assert logits.shape == (2, 24, tiny_config.decoder.vocab_size)
  # Changing the second image only changes row 0 after its placeholders (positions >= 10).
  images2 = images.copy()
  images2[0, 1] = 255 - images2[0, 1]
  logits2 = jitted(m)(variables, tokens, images2, seg, pos)
  np.testing.assert_allclose(logits[0, :10], logits2[0, :10], atol=1e-5)
  assert np.abs(logits[0, 10:] - logits2[0, 10:]).max() > 1e-4
  np.testing.assert_allclose(logits[1], logits2[1], atol=1e-5)  # row 1 uses only its first image


def _unrolled(cfg):
  import dataclasses
  return dataclasses.replace(
      cfg, encoder=dataclasses.replace(cfg.encoder, scan_layers=False),
      decoder=dataclasses.replace(cfg.decoder, scan_layers=False))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_matches_full_forward(tiny_config, scan):
  tiny_config = tiny_config if scan else _unrolled(tiny_config)
  m = model.MM1(tiny_config)
  tokens, images, seg, pos = _mm1_inputs(tiny_config, t=20)
  variables, full = init_apply(m, tokens, images, seg, pos)
  p, s = 14, 24
  cache = decoder.init_cache(tiny_config.decoder, 2, s)
  prefill = jax.jit(functools.partial(m.apply, method=model.MM1.prefill))
  decode_step = jax.jit(functools.partial(m.apply, method=model.MM1.decode_step))
  last, cache = prefill(variables, tokens[:, :p], images, np.ones((2, p), bool), cache)
  np.testing.assert_allclose(last, full[:, p - 1], atol=1e-4)
  kv_valid = np.zeros((2, s), bool)
  kv_valid[:, :p] = True
  for i in range(p, 20):
    kv_valid[:, i] = True
    logits, cache = decode_step(variables, tokens[:, i], pos[:, i], kv_valid, cache, jnp.int32(i))
    np.testing.assert_allclose(logits, full[:, i], atol=1e-4)


@pytest.mark.slow
def test_left_padded_prefill_matches_unpadded(tiny_config):
  m = model.MM1(tiny_config)
  tokens, images, seg, pos = _mm1_inputs(tiny_config, b=1, t=12)
  variables, full = init_apply(m, tokens, images, seg, pos)
  pad = 5
  padded = np.concatenate([np.zeros((1, pad), np.int32), tokens], axis=1)
  valid = np.concatenate([np.zeros((1, pad), bool), np.ones((1, 12), bool)], axis=1)
  cache = decoder.init_cache(tiny_config.decoder, 1, 20)
  last, _ = jitted(m, method=model.MM1.prefill)(variables, padded, images, valid, cache)
  np.testing.assert_allclose(last, full[:, -1], atol=1e-4)


def test_attention_cache_prefill_and_steps_match_full_attention():
  """Grouped-query attention with a KV cache: a left-padded prefill over the prompt's own
  slots (chunked, causal), then one-token steps over the whole cache, give the no-cache
  outputs of the full sequence, and each token's key/value lands in its own slot."""
  b, t, p, s = 2, 10, 8, 12
  attn = layers.Attention(num_heads=4, num_kv_heads=2, head_dim=8, causal_chunks=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, t, 16))
  valid = np.ones((b, t), bool)
  valid[0, :3] = False  # row 0: a prompt of 5 tokens left-padded to 8
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  seg = jnp.asarray(valid, jnp.int32)
  variables = jax.jit(attn.init)(jax.random.PRNGKey(1), x, model.segment_causal_mask(seg), positions)
  run = jax.jit(functools.partial(attn.apply, variables))
  want, _ = run(x, model.segment_causal_mask(seg), positions)
  cache = (jnp.zeros((b, 2, s, 8)), jnp.zeros((b, 2, s, 8)))
  out, cache = run(x[:, :p], model.cache_mask(valid[:, :p], 0, p), positions[:, :p], cache, jnp.int32(0))
  np.testing.assert_allclose(out[1], want[1, :p], atol=1e-5)
  np.testing.assert_allclose(out[0, 3:], want[0, 3:p], atol=1e-5)  # padding queries: anything
  kv_valid = np.pad(valid[:, :p], ((0, 0), (0, s - p)))
  for i in range(p, t):
    kv_valid[:, i] = True
    out, cache = run(x[:, i:i + 1], model.cache_mask(kv_valid, i, 1), positions[:, i:i + 1], cache, jnp.int32(i))
    np.testing.assert_allclose(out[:, 0], want[:, i], atol=1e-5)
  written = np.abs(np.asarray(cache[0])).sum(axis=(1, 3)) > 0  # [B, S]: which slots hold a key
  assert written[:, :t].all() and not written[:, t:].any()
  # Two new tokens appended at slot 8 with a mask over themselves only would ignore the
  # prompt in the cache: refused rather than computed.
  with pytest.raises(ValueError, match="prefill at cache slot 0"):
    attn.apply(variables, x[:, :2], model.segment_causal_mask(seg[:, :2]), positions[:, :2], cache, p)


def test_cross_entropy_ignores_zero_weights():
  logits = jnp.zeros((1, 3, 4)).at[0, 0, 1].set(10.0)
  targets = jnp.asarray([[1, 2, 3]])
  loss, aux = model.cross_entropy(logits, targets, jnp.asarray([[1.0, 0.0, 0.0]]))
  assert float(loss) < 1e-3 and float(aux["accuracy"]) == 1.0 and float(aux["num_tokens"]) == 1.0
  loss_all, _ = model.cross_entropy(logits, targets, jnp.ones((1, 3)))
  assert float(loss_all) > 0.5


def test_cross_entropy_accuracy_counts_the_largest_logit_only():
  """Catches an accuracy that counts a target below the largest logit, or a constant head
  (every logit equal, as a zero-initialised one) as always right."""
  logits = jnp.asarray([[[0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [2.0, 2.0, 2.0], [1.0, 5.0, 5.0]]])
  weights = jnp.ones((1, 4))
  hits = [model.cross_entropy(logits[:, i:i + 1], jnp.asarray([[t]]), weights[:, :1])[1]["accuracy"]
          for i, t in enumerate([1, 2, 0, 2])]
  assert [float(h) for h in hits] == [1.0, 0.0, 0.0, 1.0]
  _, aux = model.cross_entropy(logits, jnp.asarray([[1, 2, 0, 2]]), weights)
  assert float(aux["accuracy"]) == 0.5


@pytest.mark.parametrize("positions", [5, 4, 3], ids=["gathered", "gathered_full_rows", "full_head_fallback"])
def test_head_at_targets_only_matches_the_full_head(positions):
  """Catches a gather that drops, reorders or mis-weights positions, a padded capacity slot
  that counts, or a fallback that is not taken: loss, metrics and gradients (through the
  hidden states and the head's weights) equal those of the full head. Rows hold 4 and 2
  weighted positions of 8; capacities 5 and 4 (exactly full) gather, 3 falls back."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 8, 6)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
  weights = np.zeros((2, 8), np.float32)
  weights[0, [1, 2, 5, 7]] = [1.0, 0.5, 1.0, 2.0]
  weights[1, [0, 6]] = 1.0
  weights = jnp.asarray(weights)

  def loss(h, w, capacity):
    total, metrics = model.cross_entropy_at_targets(h, lambda x: x @ w, targets, weights, 1e-2, capacity)
    return total, metrics

  (want, want_m), want_g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, table, None)
  (got, got_m), got_g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                static_argnums=2)(hidden, table, positions)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-6, err_msg=k)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  assert float(got_m["logits_full_head"]) == (1.0 if positions < 4 else 0.0)


def test_head_at_targets_keeps_no_full_logits_for_the_backward_pass():
  """Catches the fallback branch's residuals kept on every step: under autodiff a `lax.cond`
  carries both branches' residuals, the untaken one's as zeros, so an unrematerialised full
  head writes float32[B, T, V] each step even when the gathered head ran. The compiled
  gradient's temporaries (which count both branches' own buffers) must stay within half a
  logits array of the plain full head's."""
  b, t, d, v, capacity = 2, 64, 8, 4096, 8
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  weights = jnp.zeros((b, t)).at[:, :capacity].set(1.0)

  def loss(h, w, weights, capacity):  # weights an argument: constants would fold the branch away
    return model.cross_entropy_at_targets(h, lambda x: x @ w, targets, weights, 0.0, capacity)[0]

  def temp_bytes(capacity):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
    return grad.lower(hidden, table, weights, capacity).compile().memory_analysis().temp_size_in_bytes

  full_logits = b * t * v * 4
  assert temp_bytes(capacity) < temp_bytes(None) + full_logits // 2


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights(tiny_config):
  import dataclasses
  cfg = dataclasses.replace(
      tiny_config,
      encoder=dataclasses.replace(tiny_config.encoder, dtype="bfloat16"),
      connector=dataclasses.replace(tiny_config.connector, dtype="bfloat16"),
      decoder=dataclasses.replace(tiny_config.decoder, dtype="bfloat16"))
  m = model.MM1(cfg)
  tokens, images, seg, pos = _mm1_inputs(cfg)
  variables, logits = init_apply(m, tokens, images, seg, pos)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  _, ref = init_apply(model.MM1(tiny_config), tokens, images, seg, pos)
  assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


@pytest.mark.slow
def test_scanned_and_unrolled_stacks_compute_the_same_function(tiny_config):
  """Same weights, laid out stacked or per block, give the same logits."""
  tokens, images, seg, pos = _mm1_inputs(tiny_config)
  scanned, logits = init_apply(model.MM1(tiny_config), tokens, images, seg, pos)
  params = jax.tree.map(lambda x: x, scanned["params"])
  for part in ("encoder", "decoder"):
    stacked = params[part].pop("blocks")["layers"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    params[part]["blocks"] = {f"block_{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(depth)}  # noqa: B023
  unrolled = jitted(model.MM1(_unrolled(tiny_config)))({"params": params}, tokens, images, seg, pos)
  np.testing.assert_allclose(logits, unrolled, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_gradients(tiny_config, policy):
  import dataclasses
  cfg = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, remat_policy=policy),
                            encoder=dataclasses.replace(tiny_config.encoder, remat_policy=policy))
  tokens, images, seg, pos = _mm1_inputs(tiny_config)
  variables, _ = init_apply(model.MM1(tiny_config), tokens, images, seg, pos)

  def grads(c):
    f = lambda p: model.MM1(c).apply({"params": p}, tokens, images, seg, pos).sum()  # noqa: E731
    return jax.jit(jax.grad(f))(variables["params"])

  for a, b in zip(jax.tree.leaves(grads(tiny_config)), jax.tree.leaves(grads(cfg))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="remat_policy"):
    bad = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, remat_policy="x"))
    model.MM1(bad).init(jax.random.PRNGKey(0), tokens, images, seg, pos)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_attention_matches_the_reference_and_chunking_changes_nothing(chunks):
  """layers.attend (grouped heads) against jax.nn.dot_product_attention, and the causal
  block form against the full score matrix, on a packed (segment + causal) mask."""
  from mm1_jax import layers
  from mm1_jax.model import segment_causal_mask

  b, t, n, kh, h = 2, 16, 4, 2, 8
  ks = jax.random.split(jax.random.PRNGKey(chunks), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, kh, h))
  v = jax.random.normal(ks[2], (b, t, kh, h))
  seg = jnp.asarray([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])
  mask = segment_causal_mask(seg, None)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(layers.attend(q, k, v, mask), want, atol=2e-6)
  np.testing.assert_allclose(layers.causal_attend(q, k, v, mask, chunks), want, atol=2e-6)
