"""Model FLOPs of a training step: the numerator of MFU (see `mm1_jax.hardware`).

Counted from the parameter tree and the work of the step (`Work`):
- every weight matrix or conv kernel costs 2 FLOPs per parameter per position it is applied
  to (decoder tokens, ViT patches, connector grid cells or image tokens);
- attention costs 4 x width x (query, key) pairs per layer (scores and values): the ViT
  scores all patch pairs; the decoder is causal and counts T^2 / 2 pairs a sequence of T
  tokens (MaxText's convention, which halves PaLM's 12·L·H·Q·T training term), summed over
  the packed segments of a row;
- a sparse FFN layer counts the router and top_k of its experts per token;
- a training step is 3x the forward pass (backward = 2x forward).

Two ways to fill `Work`:
- `slot_work`: every token and image slot of the batch shape (what a step of that shape
  could hold; the preflight's "raw" figure);
- `batch_work`: the real tokens (segment id > 0), the real images (placeholder runs) and the
  causal pairs within each packed segment of an actual batch: the "useful" figure that MFU
  reports. Padding, empty image slots and cross-segment attention are not work.

`executed_work` and `executed_moe=True` instead describe what the compiled program runs
(query blocks of the chunked causal attention, every capacity slot and the one-hot dispatch
and combine einsums): they explain the compiler's FLOP count, and the tests compare them with
XLA's. They are not MFU numerators.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from mm1_jax.aim import AIMConfig, AIMv2Config
from mm1_jax.contrastive import ContrastiveConfig
from mm1_jax.model import MM1Config


@dataclasses.dataclass(frozen=True)
class Work:
  """What one step processes, summed over the batch."""

  tokens: float  # decoder positions
  images: float  # images through the encoder and connector
  attention_pairs: float  # decoder (query, key) pairs scored
  groups: int = 0  # rows (MoE capacity groups); only the executed MoE count reads it
  seq_len: int = 0  # tokens a row; likewise


def slot_work(batch_size: int, seq_len: int, num_images: int) -> Work:
  """Every slot of a [batch_size, seq_len] batch with num_images image slots a row; causal."""
  return Work(tokens=float(batch_size * seq_len), images=float(batch_size * num_images),
              attention_pairs=batch_size * seq_len ** 2 / 2, groups=batch_size, seq_len=seq_len)


def executed_work(batch_size: int, seq_len: int, num_images: int, attention_chunks: int = 1) -> Work:
  """What the compiled step computes: with n query blocks the causal attention scores
  (n + 1) / (2n) of the full T x T matrix (`layers.causal_attend`); n = 1 scores all of it."""
  n = attention_chunks if attention_chunks > 1 and seq_len % attention_chunks == 0 else 1
  return Work(tokens=float(batch_size * seq_len), images=float(batch_size * num_images),
              attention_pairs=batch_size * seq_len ** 2 * (n + 1) / (2 * n), groups=batch_size,
              seq_len=seq_len)


def batch_work(batch: dict, config) -> Work:
  """The useful work of a host batch (numpy): real tokens, real images, causal pairs per segment."""
  seg = np.asarray(batch["segment_ids"])
  b, t = seg.shape
  tokens = float((seg > 0).sum())
  pairs = 0.0
  for row in seg:
    lengths = np.bincount(row[row > 0])
    pairs += float(np.sum(lengths.astype(np.float64) ** 2) / 2)
  if isinstance(config, AIMConfig):  # one image a row, no decoder
    images = float(np.asarray(batch["images"]).shape[0] * np.asarray(batch["images"]).shape[1])
  else:
    placeholders = int((np.asarray(batch["tokens"]) == config.image_token_id).sum())
    images = placeholders / config.tokens_per_image
  return Work(tokens=tokens, images=images, attention_pairs=pairs, groups=b, seq_len=t)


def _names(path) -> list[str]:
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def _matmul_params(tree, skip=()) -> int:
  """Parameters of weight matrices and conv kernels ('kernel' leaves; stacked layers included)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = _names(path)
    if names[-1] == "kernel" and not any(n in skip for n in names):
      total += math.prod(leaf.shape)
  return total


def _vit_per_image(params, enc) -> float:
  patches = enc.num_patches + (1 if enc.use_cls else 0)
  # A conv stem's kernels run at every output pixel of their own layer, not once a patch.
  stem, cin = 0.0, 3
  for channels, side in enc.stem_convs:
    stem += 2 * 9 * cin * channels * side * side
    cin = channels
  return (2 * _matmul_params(params["encoder"], skip=("stem",)) * patches + stem
          + 4 * enc.depth * patches ** 2 * enc.width)


def forward_flops(params, config: MM1Config | AIMConfig | AIMv2Config | ContrastiveConfig, work: Work, *,
                  executed_moe: bool = False) -> float:
  """Forward FLOPs of `work`. params may be abstract (jax.ShapeDtypeStruct leaves).

  AIM (v1): encoder and pixel head per image. AIMv2: MM1's count plus the pixel head.
  Contrastive: `_contrastive_forward`.
  """
  enc = config.encoder
  vit = _vit_per_image(params, enc)
  if isinstance(config, AIMConfig):
    return float(work.images * (vit + 2 * _matmul_params(params["head"]) * enc.num_patches))
  if isinstance(config, ContrastiveConfig):
    return _contrastive_forward(params, config, work, vit)
  total = _mm1_forward(params, config, work, vit, executed_moe)
  if isinstance(config, AIMv2Config):
    total += work.images * 2 * _matmul_params(params["pixel_head"]) * enc.num_patches
  return float(total)


def train_flops(params, config, work: Work, *, executed_moe: bool = False) -> float:
  return 3.0 * forward_flops(params, config, work, executed_moe=executed_moe)


def train_flops_per_step(params, config, batch_size: int, seq_len: int, num_images: int) -> float:
  """Every slot counted (`slot_work`): the raw figure of a step of that shape."""
  return train_flops(params, config, slot_work(batch_size, seq_len, num_images))


def useful_train_flops(params, config, batch: dict) -> float:
  """The MFU numerator of a real batch (`batch_work`)."""
  return train_flops(params, config, batch_work(batch, config))


def useful_flops_counter(params, config):
  """batch -> useful training FLOPs, the parameter tree read once (the count is linear in
  tokens, images and attention pairs; the training loop calls this every step)."""
  unit = {f: train_flops(params, config, Work(**{g: float(g == f) for g in ("tokens", "images",
                                                                            "attention_pairs")}))
          for f in ("tokens", "images", "attention_pairs")}

  def count(batch: dict) -> float:
    w = batch_work(batch, config)
    return sum(unit[f] * getattr(w, f) for f in unit)
  return count


def _contrastive_forward(params, config: ContrastiveConfig, work: Work, vit: float) -> float:
  """Per image: trunk, pooling head (a MAP head's keys and values over every patch, the
  rest on its one query), projection. Text tower: the decoder's count over the caption
  tokens (the batch's tokens less one placeholder an image; its attention pairs counted
  with them, a slight overcount) and its projection, without an LM head. The B x B
  similarity matrix (2 x B^2 x embed_dim) is left out: it is not linear in the batch, and
  small beside the towers."""
  enc, txt = config.encoder, config.text
  image = vit + 2 * _matmul_params(params["image_proj"])
  if "image_pool" in params:
    pool = params["image_pool"]
    kv = _matmul_params({k: v for k, v in pool.items() if k in ("key", "value")})
    image += 2 * kv * enc.num_patches + 2 * (_matmul_params(pool) - kv) + 4 * enc.num_patches * enc.width
  tokens = work.tokens - work.images * config.tokens_per_image  # linear in the work (useful_flops_counter)
  text = (2 * _matmul_params(params["text"]) * tokens
          + 4 * txt.depth * work.attention_pairs * txt.num_heads * txt.head_dim
          + 2 * _matmul_params(params["text_proj"]) * work.images)
  return float(work.images * image + text)


def _mm1_forward(params, config, work: Work, vit: float, executed_moe: bool) -> float:
  dec = config.decoder
  attn_width = dec.num_heads * dec.head_dim
  lm_head = dec.width * dec.vocab_size if dec.tie_embeddings else 0  # a tied head has no 'kernel'
  dense = _matmul_params(params["decoder"]) + lm_head
  decoder = 2 * dense * work.tokens + 4 * dec.depth * work.attention_pairs * attn_width
  decoder += _moe_flops(params["decoder"], config, work, executed_moe)
  connector = config.connector.forward_flops(config.encoder.num_patches, config.encoder.width, dec.width)
  return work.images * (vit + connector) + decoder


def _moe_flops(tree, config: MM1Config, work: Work, executed: bool) -> float:
  """Sparse layers (not in `_matmul_params`: their leaves are not 'kernel's).

  Useful: router + top_k experts per token. Executed (capacity dispatch): router + every
  capacity slot of every expert, plus the dispatch and combine einsums.
  """
  moe = config.decoder.moe
  if moe is None:
    return 0.0
  router = experts = 0
  layers = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = _names(path)
    if "moe" not in names:
      continue
    if names[-1] == "router":
      router += math.prod(leaf.shape)
      layers += math.prod(leaf.shape[:-2]) if len(leaf.shape) > 2 else 1
    else:
      experts += math.prod(leaf.shape)
  per_expert = experts / moe.num_experts
  if not executed or moe.dispatch == "dropless":
    return 2 * (router + moe.top_k * per_expert) * work.tokens
  e, d = moe.num_experts, config.decoder.width
  slots = work.groups * e * moe.capacity(work.seq_len)  # per layer
  shuffle = 2 * 2 * work.groups * work.seq_len * e * moe.capacity(work.seq_len) * d * layers
  return 2 * router * work.tokens + 2 * per_expert * slots + shuffle
