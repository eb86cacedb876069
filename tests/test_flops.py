"""The MFU numerator (mm1_jax/flops.py) against XLA's own count, and its useful-work rules."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from mm1_jax import connector, decoder, flops, model, moe, train, vit

B, T, N = 2, 1024, 1


def _config(moe_config=None) -> model.MM1Config:
  # Sized so that the LM head, decoder attention and (with MoE) the expert FFNs each carry
  # more than 10 % of the FLOPs: a missing or mis-scaled term moves the total by more than 3 %.
  return model.MM1Config(
      encoder=vit.ViTConfig(image_size=32, patch_size=8, width=64, depth=1, num_heads=2, mlp_dim=128,
                            scan_layers=False),
      connector=connector.MLPConfig(num_tokens=16),
      decoder=decoder.DecoderConfig(vocab_size=4096, width=128, depth=2, num_heads=4, num_kv_heads=4, head_dim=32,
                                    mlp_dim=256, scan_layers=False, attention_chunks=4, moe=moe_config))


def _xla_and_ours(config):
  m = model.MM1(config)
  batch = train.dummy_batch(B, T, N, config)
  args = (batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])
  params = nn.meta.unbox(jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), *args)))["params"]
  # The lowered (pre-optimisation) HLO: the CPU backend hides matmuls in library calls.
  xla = jax.jit(lambda p: m.apply({"params": p}, *args)).lower(params).cost_analysis()["flops"]
  work = flops.executed_work(B, T, N, config.decoder.attention_chunks)
  return params, work, xla, flops.forward_flops(params, config, work, executed_moe=True)


def _shares(params, config, work, total):
  d = config.decoder
  shares = {"lm_head": 2 * d.width * d.vocab_size * work.tokens / total,
            "attention": 4 * d.depth * work.attention_pairs * d.num_heads * d.head_dim / total}
  if d.moe is not None:
    shares["experts"] = flops._moe_flops(params["decoder"], config, work, executed=False) / total
  return shares


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "moe_capacity"])
def test_model_flops_match_xla_within_3_percent(sparse):
  """Catches a missing or doubled term (LM head, attention, experts, dispatch einsums), a
  wrong attention-block fraction, or an expert count off by top_k: each is > 10 % of the total.

  MoE runs capacity dispatch at factor 2.0 with top-2: the capacity slots equal the
  assignments, so the executed expert work is the useful work plus the dispatch/combine
  einsums. (Dropless `ragged_dot` is costed by XLA as a dense product over every expert
  group, so XLA's count is no reference for it.)
  """
  moe_config = moe.MoEConfig(num_experts=4, top_k=2, every=1, dispatch="capacity",
                             capacity_factor=2.0) if sparse else None
  config = _config(moe_config)
  params, work, xla, ours = _xla_and_ours(config)
  for term, share in _shares(params, config, work, ours).items():
    assert share > 0.10, (term, share)
  assert ours == pytest.approx(xla, rel=0.03), (ours, xla)


def test_useful_work_counts_real_tokens_images_and_pairs_within_segments():
  """Catches padding counted as work, empty image slots counted as images, or attention
  counted across packed segments (the MFU numerator of a real batch).

  Row 0 packs a 6-token segment (one image of 2 tokens) and a 3-token one, then 3 padding
  positions; row 1 is one 10-token segment without an image, then 2 padding positions.
  """
  config = dataclasses.replace(_config(), connector=connector.MLPConfig(num_tokens=4))
  q = config.tokens_per_image  # 4 at 32 px / 8 px patches, after the 4-token MLP connector
  seg = np.array([[1] * 6 + [2] * 3 + [0] * 3, [1] * 10 + [0] * 2])
  tokens = np.full(seg.shape, 7)
  tokens[0, 1:1 + q] = config.image_token_id
  batch = {"segment_ids": seg, "tokens": tokens, "images": np.zeros((2, 3, 32, 32, 3), np.uint8)}
  w = flops.batch_work(batch, config)
  assert (w.tokens, w.images, w.attention_pairs) == (19, 1, (36 + 9 + 100) / 2)
  slots = flops.slot_work(2, 12, 3)
  assert (slots.tokens, slots.images, slots.attention_pairs) == (24, 6, 144)


def test_the_per_step_counter_agrees_with_the_direct_count():
  """Catches a counter (used every step in training) that drifts from the direct count."""
  config = _config()
  m = model.MM1(config)
  batch = train.dummy_batch(2, 16, 1, config)
  params = nn.meta.unbox(jax.eval_shape(lambda: m.init(
      jax.random.PRNGKey(0), batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])))["params"]
  batch["segment_ids"] = np.array([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16])
  direct = flops.useful_train_flops(params, config, batch)
  assert flops.useful_flops_counter(params, config)(batch) == pytest.approx(direct, rel=1e-12)


def test_a_conv_stem_is_counted_at_its_own_resolution():
  """Catches conv-stem kernels counted once a patch (as the trunk's matmuls are) instead of
  at every output pixel of their layer: here the stem is most of the trunk's work. XLA also
  counts the stem's norms and GELUs at full resolution (about 5 % here), which we leave out."""
  enc = vit.ViTConfig(image_size=64, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=128, stem="conv",
                      stem_width=64, scan_layers=False)
  m = vit.ViT(enc)
  images = np.zeros((1, 64, 64, 3), np.uint8)
  params = nn.meta.unbox(jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), images)))["params"]
  xla = jax.jit(lambda p: m.apply({"params": p}, images)).lower(params).cost_analysis()["flops"]
  ours = flops._vit_per_image({"encoder": params}, enc)
  stem_share = 1 - flops._vit_per_image({"encoder": {k: v for k, v in params.items() if k != "stem"}},
                                        dataclasses.replace(enc, stem="patch")) / ours
  assert stem_share > 0.5
  assert ours == pytest.approx(xla, rel=0.07), (ours, xla)
