"""The model family: encoder trunks, connectors, sparse MoE decoders, sliding windows."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import connector, decoder, model, moe, sharding, vit
from conftest import init_apply, jitted


TRUNKS = {
    "clip": dict(act="quick_gelu", use_cls=True, pre_norm=True),
    "siglip": dict(patch_bias=True),
    "aim": dict(attn_bias=False, mlp_bias=False, pos_embed="sincos2d", act="gelu_exact"),
    "aimv2": dict(norm="rmsnorm", act="swiglu", attn_bias=False, mlp_bias=False, patch_bias=True,
                  patch_norm=True),
}


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_trunks_have_their_parameters(trunk):
  cfg = vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                      scan_layers=False, **TRUNKS[trunk])
  variables, out = init_apply(vit.ViT(cfg), jnp.zeros((2, 32, 32, 3), jnp.uint8))
  p = variables["params"]
  assert out.shape == (2, 16, 32) and np.isfinite(np.asarray(out)).all()
  assert ("pos_embed" in p) == (trunk != "aim")  # AIM's sin-cos positions are fixed
  assert ("cls" in p) == (trunk == "clip") and ("ln_pre" in p) == (trunk == "clip")
  assert ("ln_patch" in p) == (trunk == "aimv2")
  assert ("bias" in p["patch_embed"]) == (trunk in ("siglip", "aimv2"))
  block = p["blocks"]["block_0"]
  assert ("bias" in block["attn"]["query"]) == (trunk in ("clip", "siglip"))
  assert ("bias" in block["ln_attn"]) == (trunk != "aimv2")  # RMSNorm has a scale only
  assert ("gate" in block["mlp"]) == (trunk == "aimv2")


def test_sincos_2d_layout():
  pe = vit.sincos_2d(4, 16)
  assert pe.shape == (16, 16)
  # Row-major: patch (y, x) = (1, 2) is row 6. AIM's (MAE's) layout: the column half first,
  # sin(x * w) with w_0 = 1, then the row half.
  np.testing.assert_allclose(pe[6, 0], np.sin(2.0), rtol=1e-6)
  np.testing.assert_allclose(pe[6, 4], np.cos(2.0), rtol=1e-6)
  np.testing.assert_allclose(pe[6, 8], np.sin(1.0), rtol=1e-6)


def test_prefix_causal_attention():
  """With prefix-causal attention, a patch's output does not depend on later non-prefix patches."""
  cfg = vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                      **TRUNKS["aim"])
  m = vit.ViT(cfg)
  images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  variables = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), images))
  prefix = jnp.array([5])
  base = m.apply(variables, images, prefix_lengths=prefix)
  changed = images.copy()
  changed[:, 24:, 24:] = 255 - changed[:, 24:, 24:]  # the last patch (15)
  after = m.apply(variables, changed, prefix_lengths=prefix)
  np.testing.assert_allclose(base[:, :15], after[:, :15], atol=1e-5)
  assert np.abs(np.asarray(base[:, 15] - after[:, 15])).max() > 1e-3
  # Bidirectional (the default) does see the change everywhere.
  full_a, full_b = m.apply(variables, images), m.apply(variables, changed)
  assert np.abs(np.asarray(full_a[:, 0] - full_b[:, 0])).max() > 1e-4
  # Inside the prefix attention is bidirectional: patch 0 sees patch 4.
  changed2 = images.copy()
  changed2[:, :8, 0:8] = 255 - changed2[:, :8, 0:8]
  moved = m.apply(variables, changed2, prefix_lengths=jnp.array([16]))
  assert np.abs(np.asarray(m.apply(variables, images, prefix_lengths=jnp.array([16]))[:, 3]
                           - moved[:, 3])).max() > 1e-4


def test_resize_pos_embed_keeps_cls_and_smooth_grids():
  g = 4
  yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  grid = np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float32)  # a linear ramp per channel
  pos = np.concatenate([np.full((1, 2), 7.0, np.float32), grid])
  out = vit.resize_pos_embed(pos, 8, num_prefix=1)
  assert out.shape == (1 + 64, 2)
  np.testing.assert_array_equal(out[0], [7.0, 7.0])
  ramp = out[1:].reshape(8, 8, 2)[..., 0]
  assert (np.diff(ramp[2:6, 3]) > 0).all()  # still increasing down the rows
  with pytest.raises(ValueError, match="not a square"):
    vit.resize_pos_embed(np.zeros((10, 2)), 4)


def test_avg_pool_is_a_mean_over_its_window():
  feats = jnp.arange(16 * 2, dtype=jnp.float32).reshape(1, 16, 2)
  m = connector.AvgPoolConfig(num_tokens=4).build(out_dim=2)
  variables = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), feats))
  p = variables["params"]["proj"]
  identity = {"params": {"proj": {"kernel": jnp.eye(2), "bias": jnp.zeros_like(p["bias"])}}}
  out = m.apply(identity, feats)
  grid = np.asarray(feats).reshape(4, 4, 2)
  np.testing.assert_allclose(out[0, 0], grid[:2, :2].reshape(-1, 2).mean(0))
  np.testing.assert_allclose(out[0, 3], grid[2:, 2:].reshape(-1, 2).mean(0))


def test_per_patch_projector_needs_one_token_per_patch():
  with pytest.raises(ValueError, match="num_tokens must be 16"):
    init_apply(connector.LinearConfig(num_tokens=4).build(out_dim=8), jnp.ones((1, 16, 8)))


# ----------------------------------------------------------------------------- MoE


def _moe_model(tiny_config, **moe_kwargs):
  kwargs = dict(num_experts=4, top_k=2, every=2, capacity_factor=4.0) | moe_kwargs
  dc = dataclasses.replace(tiny_config.decoder, moe=moe.MoEConfig(**kwargs))
  return dataclasses.replace(tiny_config, decoder=dc)


def _inputs(t=12):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t), 5, 256)
  images = jnp.zeros((2, 1, 64, 64, 3), jnp.uint8)
  seg = jnp.ones((2, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  return tokens, images, seg, pos


def test_router_renormalises_top_k():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  probs, w, ids = moe.route(logits, 2)
  np.testing.assert_allclose(probs, [[0.5, 0.3, 0.15, 0.05]], rtol=1e-6)
  np.testing.assert_array_equal(ids, [[0, 1]])
  np.testing.assert_allclose(w, [[0.625, 0.375]], rtol=1e-6)
  # Perfect balance gives 1.0; all tokens on one expert gives E * P(that expert).
  uniform = jnp.full((4, 4), 0.25)
  assert float(moe.load_balance_loss(uniform, jnp.arange(8).reshape(4, 2) % 4)) == pytest.approx(1.0)


def test_padding_takes_no_capacity_and_stays_out_of_the_statistics():
  probs = jnp.array([[0.7, 0.1, 0.1, 0.1]] * 3 + [[0.1, 0.1, 0.1, 0.7]])
  ids = jnp.array([[0, 1]] * 3 + [[3, 2]])
  valid = jnp.array([True, False, False, True])
  masked = moe.load_balance_loss(probs, ids, valid)
  subset = moe.load_balance_loss(probs[jnp.array([0, 3])], ids[jnp.array([0, 3])])
  np.testing.assert_allclose(masked, subset, rtol=1e-6)
  # One slot per expert: 4 tokens all routed to experts 0 and 1 drop 3 of 4 first choices,
  # but if 3 of them are padding, the one real token keeps both of its slots.
  d, f = 8, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, d))
  w = [jax.random.normal(jax.random.PRNGKey(i), s) for i, s in enumerate([(4, d, f), (4, d, f), (4, f, d)])]
  weights = jnp.full((1, 4, 2), 0.5)
  same = jnp.tile(jnp.array([[0, 1]]), (1, 4, 1))
  _, drop_all = moe._capacity(x, weights, same, jnp.ones((1, 4), bool), *w, capacity=1)
  y, drop_real = moe._capacity(x, weights, same, jnp.array([[False, True, False, False]]), *w, capacity=1)
  assert float(drop_all) == pytest.approx(0.75) and float(drop_real) == 0.0
  assert np.abs(np.asarray(y[0, 1])).max() > 0  # the real token was computed


@pytest.mark.slow
def test_capacity_and_dropless_agree_without_drops(tiny_config):
  args = _inputs()
  cap = model.MM1(_moe_model(tiny_config, dispatch="capacity", capacity_factor=8.0))
  variables = nn.meta.unbox(jax.jit(cap.init)(jax.random.PRNGKey(0), *args))
  a, stats = jitted(cap, mutable=["moe"])(variables, *args)
  b = jitted(model.MM1(_moe_model(tiny_config, dispatch="dropless")))(variables, *args)
  np.testing.assert_allclose(a, b, atol=2e-5)
  assert float(moe.summarize_aux(stats["moe"])["drop_rate"]) == 0.0


@pytest.mark.slow
def test_capacity_drops_tokens_and_reports_it(tiny_config):
  args = _inputs(t=16)
  m = model.MM1(_moe_model(tiny_config, capacity_factor=0.25))  # 1 slot per expert for 32 assignments
  variables = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), *args))
  _, stats = jitted(m, mutable=["moe"])(variables, *args)
  summary = moe.summarize_aux(stats["moe"])
  assert float(summary["drop_rate"]) >= 0.5
  assert set(summary) == {"load_balance", "router_z", "drop_rate"}


@pytest.mark.slow
@pytest.mark.parametrize("every,scan", [(2, True), (2, False), (1, True)])
def test_moe_stack_layout_and_cache_decoding(tiny_config, every, scan):
  cfg = _moe_model(tiny_config, every=every, dispatch="dropless")
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=scan))
  m = model.MM1(cfg)
  tokens, images, seg, pos = _inputs()
  variables, full = init_apply(m, tokens, images, seg, pos)
  blocks = variables["params"]["decoder"]["blocks"]
  if every == 2 and scan:
    assert blocks["layers"]["sparse"]["moe"]["gate"].shape == (1, 4, 64, 128)
    assert "mlp" in blocks["layers"]["dense_0"]
  if every == 1:
    assert blocks["layers"]["moe"]["router"].shape == (2, 64, 4)
  cache = decoder.init_cache(cfg.decoder, 2, 12)
  last, cache = jitted(m, method=model.MM1.prefill)(variables, tokens[:, :6], images, jnp.ones((2, 6), bool),
                                                    cache)
  np.testing.assert_allclose(last, full[:, 5], atol=1e-4)
  kv_valid = jnp.zeros((2, 12), bool).at[:, :7].set(True)
  step, _ = jitted(m, method=model.MM1.decode_step)(variables, tokens[:, 6], pos[:, 6], kv_valid, cache,
                                                    jnp.int32(6))
  np.testing.assert_allclose(step, full[:, 6], atol=1e-4)


def test_expert_weights_carry_the_expert_axis(tiny_config):
  m = model.MM1(_moe_model(tiny_config))
  boxed = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), *_inputs())["params"])
  moe_params = boxed["decoder"]["blocks"]["layers"]["sparse"]["moe"]
  assert moe_params["gate"].names == ("layers", "expert", "embed", "mlp")
  assert moe_params["down"].names == ("layers", "expert", "mlp", "embed")
  assert ("expert", "expert") in sharding.DECODER_RULES  # the expert mesh axis


@pytest.mark.slow
def test_train_step_adds_and_logs_moe_losses(tiny_config):
  import optax

  from mm1_jax import train

  cfg = _moe_model(tiny_config, capacity_factor=1.0)
  m = model.MM1(cfg)
  batch = train.dummy_batch(2, 24, 1, cfg)
  batch["tokens"] = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 24), 5, 256), np.int32)
  batch["loss_weights"] = np.ones((2, 24), np.float32)
  params = nn.meta.unbox(train._boxed_params(m, batch, jax.random.PRNGKey(0)))
  tx = optax.sgd(0.0)
  state = train.TrainState.create(params, tx.init(params))
  # Compiled as one program, as training runs it.
  step = jax.jit(functools.partial(train.train_step, model=m, tx=tx, schedule=lambda s: 0.0))
  _, metrics = step(state, batch)
  for k in ("moe_load_balance", "moe_router_z", "moe_drop_rate"):
    assert np.isfinite(float(metrics[k]))
  assert float(metrics["moe_load_balance"]) >= 0.99  # E * sum f_e P_e >= 1 up to routing noise
  # The optimised loss is the LM loss plus the weighted auxiliary terms.
  expected = metrics["loss"] + 0.01 * metrics["moe_load_balance"] + 0.001 * metrics["moe_router_z"]
  np.testing.assert_allclose(metrics["total_loss"], expected, rtol=1e-6)
  assert float(metrics["moe_router_z"]) > 0


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.slow
def test_sliding_window_masks_and_cache(tiny_config):
  mask = model.segment_causal_mask(jnp.ones((1, 6), jnp.int32), window=3)[0, 0]
  assert mask[5].tolist() == [False, False, False, True, True, True]
  cfg = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, sliding_window=4))
  m = model.MM1(cfg)
  tokens, images, seg, pos = _inputs()
  variables, full = init_apply(m, tokens, images, seg, pos)
  _, unwindowed = init_apply(model.MM1(tiny_config), tokens, images, seg, pos)
  assert np.abs(np.asarray(full[:, -1] - unwindowed[:, -1])).max() > 1e-4
  cache = decoder.init_cache(cfg.decoder, 2, 12)
  _, cache = jitted(m, method=model.MM1.prefill)(variables, tokens[:, :8], images, jnp.ones((2, 8), bool), cache)
  kv_valid = jnp.zeros((2, 12), bool).at[:, :9].set(True)
  step, _ = jitted(m, method=model.MM1.decode_step)(variables, tokens[:, 8], pos[:, 8], kv_valid, cache,
                                                    jnp.int32(8))
  np.testing.assert_allclose(step, full[:, 8], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
def test_scanned_program_size_does_not_grow_with_depth(tiny_config, sparse):
  """Scanned stacks lower to one loop body whatever the depth; unrolled ones grow with it."""

  def program_size(depth, scan):
    dc = dataclasses.replace(tiny_config.decoder, depth=depth, scan_layers=scan,
                             moe=moe.MoEConfig(num_experts=4, every=2) if sparse else None)
    ec = dataclasses.replace(tiny_config.encoder, depth=depth, scan_layers=scan)
    m = model.MM1(dataclasses.replace(tiny_config, decoder=dc, encoder=ec))
    args = _inputs()
    params = jax.eval_shape(lambda: nn.meta.unbox(m.init(jax.random.PRNGKey(0), *args))["params"])
    return len(jax.jit(lambda p: m.apply({"params": p}, *args)).lower(params).as_text())

  assert program_size(8, True) / program_size(2, True) < 1.05
  assert program_size(8, False) / program_size(2, False) > 2.0


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_stem_tokens_are_patches_in_row_major_order(stem):
  """A pixel at the top-left corner of patch (row 1, column 5) reaches token 1 * 8 + 5 alone:
  catches a conv stem whose output grid is flattened column-major, or whose receptive
  fields are shifted by a patch, against the patch stem's order."""
  c = vit.ViTConfig(image_size=64, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem=stem,
                    stem_width=8, scan_layers=False)
  stem_fn = vit.ConvStem(c) if stem == "conv" else None
  images = np.full((1, 64, 64, 3), 0.5, np.float32)
  poked = images.copy()
  poked[0, 8, 40] = 1.0
  if stem == "conv":
    params = stem_fn.init(jax.random.PRNGKey(0), images)
    out, ref = stem_fn.apply(params, poked), stem_fn.apply(params, images)
  else:
    out, ref = vit.patchify(poked, 8), vit.patchify(images, 8)
  changed = np.flatnonzero(np.abs(np.asarray(out - ref)).max(-1) > 1e-6)
  assert changed.tolist() == [13]
