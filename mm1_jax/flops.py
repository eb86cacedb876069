"""Model FLOPs per training step, counted from the parameter tree and the batch shape.

Each weight matrix costs 2 FLOPs per parameter per position it is applied to
(tokens for the decoder, patches for the ViT, grid cells for the connector's convs),
attention adds 4 * T^2 * width per layer, and a training step is 3x the forward
pass (backward = 2x forward). Sparse layers count what a token runs: the router and
top_k of the experts (capacity slots left empty or dropped assignments are not
subtracted). This is the numerator of MFU.
"""

from __future__ import annotations

import math

import jax

from mm1_jax.aim import AIMConfig, AIMv2Config
from mm1_jax.model import MM1Config


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _matmul_params(tree, skip=()) -> int:
  """Parameters of weight matrices and conv kernels ('kernel' leaves; stacked layers included)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[-1] == "kernel" and not any(n in skip for n in names):
      total += math.prod(leaf.shape)
  return total


def forward_flops_per_sequence(params, config: MM1Config | AIMConfig | AIMv2Config, seq_len: int,
                               num_images: int) -> float:
  """AIM (v1): encoder and pixel head per image; AIMv2: MM1's count plus the pixel head."""
  enc = config.encoder
  patches = enc.num_patches + (1 if enc.use_cls else 0)
  vit = 2 * _matmul_params(params["encoder"]) * patches + 4 * enc.depth * patches ** 2 * enc.width
  if isinstance(config, AIMConfig):
    return float(num_images * (vit + 2 * _matmul_params(params["head"]) * enc.num_patches))
  if isinstance(config, AIMv2Config):
    head = 2 * _matmul_params(params["pixel_head"]) * enc.num_patches
    return float(num_images * head + _mm1_forward(params, config, seq_len, num_images, vit))
  return _mm1_forward(params, config, seq_len, num_images, vit)


def _mm1_forward(params, config, seq_len: int, num_images: int, vit: float) -> float:
  enc, dec = config.encoder, config.decoder
  image_tokens = config.tokens_per_image

  conn = 0
  for name, sub in params["connector"].items():
    if name.startswith("stage1") or name in ("key", "value"):  # applied per patch
      cells = enc.num_patches
    elif name in ("pos_embed", "queries") or name.startswith(("ln_", "se_")):
      continue
    else:  # applied per image token
      cells = image_tokens
    conn += 2 * _matmul_params(sub, skip=("se_reduce", "se_expand")) * cells
  if "queries" in params["connector"]:  # attention pooling: Q queries over the patches
    conn += 4 * image_tokens * enc.num_patches * enc.width

  attn_width = dec.num_heads * dec.head_dim
  lm_head = dec.width * dec.vocab_size
  decoder = (2 * (_matmul_params(params["decoder"]) + (lm_head if dec.tie_embeddings else 0)
                  + _active_expert_params(params["decoder"], config)) * seq_len
             + 4 * dec.depth * seq_len ** 2 * attn_width)
  return float(num_images * (vit + conn) + decoder)


def _active_expert_params(tree, config: MM1Config) -> float:
  """Router plus top_k / num_experts of the expert weights of every sparse layer."""
  moe = config.decoder.moe
  if moe is None:
    return 0.0
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if "moe" in names:
      share = 1.0 if names[-1] == "router" else moe.top_k / moe.num_experts
      total += share * math.prod(leaf.shape)
  return total


def train_flops_per_step(params, config: MM1Config, batch_size: int, seq_len: int,
                         num_images: int) -> float:
  """params may be abstract (jax.ShapeDtypeStruct leaves)."""
  return 3.0 * batch_size * forward_flops_per_sequence(params, config, seq_len, num_images)
