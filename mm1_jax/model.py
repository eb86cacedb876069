"""MM1: image encoder -> connector -> decoder-only LLM.

Each image becomes Q tokens. The text sequence carries Q copies of the image
placeholder id for every image, in order; `splice_images` swaps those positions
for the connector's outputs. Loss is on text tokens only.

Batch layout (see `mm1_jax.data.pipeline`):
  tokens:       int32[B, T]   inputs, image placeholders included
  targets:      int32[B, T]   next token
  loss_weights: float32[B, T] 1 on text targets, 0 on image placeholders and padding
  segment_ids:  int32[B, T]   0 is padding; packed examples get distinct ids
  positions:    int32[B, T]   position within its segment
  images:       uint8[B, N, H, W, 3], N images per sequence (unused slots are zeros)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax import connector as connector_lib
from mm1_jax import decoder as decoder_lib
from mm1_jax import sharding
from mm1_jax import vit as vit_lib


@dataclasses.dataclass(frozen=True)
class MM1Config:
  """Composite config: one sub-config per component."""

  encoder: vit_lib.ViTConfig = vit_lib.ViTConfig()
  connector: connector_lib.ConnectorConfig = connector_lib.CAbstractorConfig()
  decoder: decoder_lib.DecoderConfig = decoder_lib.DecoderConfig()
  image_token_id: int = 3  # id of the `<image>` placeholder (mm1_jax.data.tokenizer.IMAGE_ID)

  @property
  def tokens_per_image(self) -> int:
    # Per-patch projectors may leave num_tokens unset: one token per patch.
    return self.connector.tokens(self.encoder.num_patches)

  def build(self) -> "MM1":
    return MM1(self)


def splice_images(text_emb: jax.Array, image_emb: jax.Array, is_image: jax.Array) -> jax.Array:
  """Puts image tokens at the placeholder positions, in order.

  Args:
    text_emb: float[B, T, D] token embeddings.
    image_emb: float[B, M, D] image tokens (M = images x Q), in sequence order.
    is_image: bool[B, T]; row b must have at most M True entries.
  Returns:
    float[B, T, D]
  """
  idx = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1
  idx = jnp.clip(idx, 0, image_emb.shape[1] - 1)
  gathered = jnp.take_along_axis(image_emb, idx[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(text_emb.dtype), text_emb)


def segment_causal_mask(segment_ids: jax.Array, window: int | None = None) -> jax.Array:
  """bool[B, 1, T, T]: causal, within the same segment, padding (id 0) excluded.

  With `window`, a query also sees only the `window` most recent keys (itself
  included), as Mistral's sliding-window attention. A padding query keeps a
  self-edge so that its softmax row is never empty.
  """
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  if window is not None:
    causal &= ~jnp.tril(jnp.ones((t, t), bool), -window)
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  valid = (segment_ids[:, None, :] > 0) | jnp.eye(t, dtype=bool)[None]
  return (causal[None] & same & valid)[:, None]


def cache_mask(kv_valid: jax.Array, index: jax.Array | int, num_queries: int,
               window: int | None = None) -> jax.Array:
  """bool[B, 1, T, S] for queries at cache slots [index, index + T) over S cache slots.

  Valid entries of a row are contiguous (left padding only), so slot distance is
  token distance and `window` (see `segment_causal_mask`) applies to slots.
  """
  s = kv_valid.shape[1]
  q_slot = jnp.asarray(index) + jnp.arange(num_queries)
  k_slot = jnp.arange(s)
  causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
  if window is not None:
    causal &= k_slot[None, :] > q_slot[:, None] - window
  own = k_slot[None, :] == q_slot[:, None]  # keep a self-edge for left-padding queries
  return ((causal[None] & kv_valid[:, None, :]) | own[None])[:, None]


class MM1(nn.Module):
  config: MM1Config

  def setup(self):
    c = self.config
    self.encoder = vit_lib.ViT(c.encoder, name="encoder")
    self.connector = c.connector.build(out_dim=c.decoder.width, name="connector")
    self.decoder = decoder_lib.Decoder(c.decoder, name="decoder")

  def encode_images(self, images: jax.Array) -> jax.Array:
    """uint8[B, N, H, W, 3] -> image tokens float[B, N * Q, D]."""
    b, n = images.shape[:2]
    with sharding.encoder_axes():  # the image tower follows the encoder rule set
      feats = self.encoder(images.reshape((b * n,) + images.shape[2:]))
      tokens = self.connector(feats)  # [B * N, Q, D]
    return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

  def embed_inputs(self, tokens: jax.Array, images: jax.Array) -> jax.Array:
    text = self.decoder.embed(tokens)
    return splice_images(text, self.encode_images(images), tokens == self.config.image_token_id)

  def __call__(self, tokens: jax.Array, images: jax.Array, segment_ids: jax.Array,
               positions: jax.Array, hidden: bool = False) -> jax.Array:
    """Training / scoring forward pass: logits float32[B, T, V], or with `hidden` the
    final-norm hidden states float[B, T, D] that `head` turns into logits."""
    x = self.embed_inputs(tokens, images)
    window = self.config.decoder.sliding_window
    out, _ = self.decoder(x, segment_causal_mask(segment_ids, window), positions, valid=segment_ids > 0,
                          return_hidden=hidden, segment_ids=segment_ids)
    return out

  def head(self, hidden: jax.Array) -> jax.Array:
    """Final-norm hidden states float[..., D] -> logits float32[..., V]."""
    return self.decoder.logits(hidden)

  def prefill(self, tokens: jax.Array, images: jax.Array, valid: jax.Array, cache):
    """Runs a left-padded prompt into an empty cache.

    Args:
      tokens: int32[B, P] prompts, left-padded.
      images: uint8[B, N, H, W, 3].
      valid: bool[B, P], False on padding.
      cache: empty caches of length S >= P (`decoder.init_cache`).
    Returns:
      (logits of the last prompt position float32[B, V], filled cache)
    """
    if decoder_lib.cache_length(cache) < tokens.shape[1]:
      raise ValueError(f"cache of {decoder_lib.cache_length(cache)} slots for a {tokens.shape[1]}-token prompt")
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    x = self.embed_inputs(tokens, images)
    # Over the prompt's own slots only: the cache is empty past them, so its attention is
    # the training one (causal, chunked), and the prompt's entries are written at slot 0.
    mask = cache_mask(valid, 0, tokens.shape[1], self.config.decoder.sliding_window)
    logits, cache = self.decoder(x, mask, positions, cache, 0, valid=valid, last_only=True)
    return logits[:, -1], cache

  def decode_step(self, token: jax.Array, position: jax.Array, kv_valid: jax.Array, cache,
                  index: jax.Array):
    """One decoding step: token int32[B], position int32[B] at cache slot `index`."""
    x = self.decoder.embed(token[:, None])
    mask = cache_mask(kv_valid, index, 1, self.config.decoder.sliding_window)
    logits, cache = self.decoder(x, mask, position[:, None], cache, index)
    return logits[:, 0], cache


def cross_entropy_at_targets(hidden: jax.Array, head: Callable[[jax.Array], jax.Array],
                             targets: jax.Array, weights: jax.Array, z_loss: float = 0.0,
                             positions: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`cross_entropy` of `head(hidden)`, with the head run only where the loss reads it.

  Image placeholders and padding carry no loss, yet a full head computes their logits: in
  MM1's sequences, up to 16 images of 144 tokens, 2,304 of 4,096 positions. With
  `positions` = P, each row's positions of non-zero weight (at most P of them) are gathered,
  in order, into a [B, P] block and only those go through the head; when a row of the batch
  has more than P, the step falls back to the full head (`lax.cond`: only the branch taken
  runs). Either way the result is `cross_entropy` of the full logits, up to summation order;
  the metric `logits_full_head` is 1 on a step that fell back. P = None: always the full head.
  The fallback is decided for the whole batch: with packed rows of a mixture that holds
  text-only data, a P well below T may fall back often; watch the metric.

  Args:
    hidden: float[B, T, D] final-norm hidden states; head: hidden -> float32 logits.
    targets: int32[B, T]; weights: float32[B, T]; z_loss as in `cross_entropy`.
    positions: P, the static per-row capacity (the sequence length less the image tokens a
      row always holds is safe; fewer gains more while rows fit).
  """
  if positions is None or positions >= hidden.shape[1]:
    return cross_entropy(head(hidden), targets, weights, z_loss)
  keep = weights != 0
  counts = keep.sum(axis=1)

  def gathered(_):
    idx = jax.vmap(lambda row: jnp.nonzero(row, size=positions, fill_value=0)[0])(keep)  # [B, P]
    h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
    w = jnp.take_along_axis(weights, idx, axis=1) * (jnp.arange(positions) < counts[:, None])
    return cross_entropy(head(h), jnp.take_along_axis(targets, idx, axis=1), w, z_loss)

  # Rematerialised: under autodiff a `lax.cond` keeps the residuals of both branches, the
  # branch not taken filled with zeros; saved, the full head's would be float32[B, T, V]
  # written on every step that takes the gathered branch. The fallback recomputes instead.
  @jax.checkpoint
  def full(_):
    return cross_entropy(head(hidden), targets, weights, z_loss)

  fits = counts.max() <= positions
  total, metrics = jax.lax.cond(fits, gathered, full, None)
  return total, dict(metrics, logits_full_head=1.0 - fits.astype(jnp.float32))


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean next-token cross-entropy, float32 throughout.

  Args:
    logits: float32[B, T, V]; targets: int32[B, T]; weights: float32[B, T].
    z_loss: weight of the log-partition penalty (z^2), 0 to disable.
  Returns:
    (loss, {'loss', 'z_loss', 'accuracy', 'num_tokens'})
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  denom = jnp.maximum(weights.sum(), 1.0)
  loss = (nll * weights).sum() / denom
  zl = (jnp.square(log_z) * weights).sum() / denom
  # A hit when the target's logit is the largest. Max and min fuse with logsumexp's own pass
  # over [.., V], where an argmax is a second, index-carrying one.
  # A target tied for the largest counts; all logits equal (a constant head) does not.
  hit = (target_logit >= logits.max(axis=-1)) & (target_logit > logits.min(axis=-1))
  acc = (hit * weights).sum() / denom
  total = loss + z_loss * zl
  return total, {"loss": loss, "z_loss": zl, "accuracy": acc, "num_tokens": weights.sum()}
