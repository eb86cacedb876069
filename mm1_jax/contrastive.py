"""Image-encoder pre-training: the contrastive image-text objectives, CLIP and SigLIP.

MM1's own image encoder was CLIP-trained. This objective trains a `vit.ViT` trunk beside
a text tower on image-caption pairs, and MM1 takes the trunk over as it does an AIM one:
`train.init_from = ["<run>/checkpoints:encoder"]`.

  image -> ViT (bidirectional) -> pool over the patches (mean, or a MAP head: one learned
    query attending to the patches, then an MLP, as SigLIP) -> Linear -> L2-normalised
  caption -> causal transformer (`decoder.Decoder`, its LM head unused) -> the state at the
    caption's last token (CLIP's end-of-text pooling: the only position that has read the
    whole caption) -> Linear -> L2-normalised

Losses over the B x B similarity matrix of a batch's pairs:
  siglip  pairwise sigmoid (SigLIP): every (image, caption) pair is a binary problem,
          -1/n sum_ij log sigmoid(z_ij (t x_i . y_j + b)), z = +1 on the diagonal, -1 off it;
          t = exp(t') with t' learned from log 10, b learned from -10.
  clip    symmetric softmax cross-entropy (CLIP): image -> caption and caption -> image,
          logits s x_i . y_j with s = exp(s') learned from 1 / 0.07, capped at 100.

The batch is MM1's (tokens, targets, loss_weights, segment_ids, positions, images), one
caption pair a row (`MAX_IMAGES = 1`, unpacked): the row's `<image>` placeholders (one an
image, `tokens_per_image = 1`) mark the image, and the text tower reads the row's other
real tokens, at positions counted from its first caption token, so neither placeholders
nor padding change what it computes. A row without an image, or without caption tokens,
takes no part in the loss, as image or as caption. The similarity matrix is over the
global batch: under jit, with the batch sharded over the data axes, GSPMD gathers the
embeddings of the other shards for it (B x E floats each, small beside the towers).

After pre-training only the trunk is kept (MM1, `mm1-probe`); pooling head, projections,
text tower, temperature and bias are dropped.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax import aim
from mm1_jax import decoder as decoder_lib
from mm1_jax import layers
from mm1_jax import sharding
from mm1_jax import vit as vit_lib
from mm1_jax.model import segment_causal_mask

LOSSES = ("siglip", "clip")
POOLS = ("map", "mean")
SIGLIP_LOGIT_SCALE = math.log(10.0)  # SigLIP's t' init
SIGLIP_LOGIT_BIAS = -10.0  # SigLIP's b init
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's init of the log logit scale
_NEG = float(jnp.finfo(jnp.float32).min)  # finite: a row with no valid column stays finite


# --- the losses -----------------------------------------------------------------------


def siglip_loss(img: jax.Array, txt: jax.Array, valid: jax.Array, scale: jax.Array, bias: jax.Array
                ) -> jax.Array:
  """SigLIP's sigmoid loss, summed over the valid pairs (i, j) and divided by the valid rows.

  Args:
    img, txt: float[B, E] L2-normalised embeddings, row i of each one pair.
    valid: bool[B], rows that take part.
    scale: the temperature t (not its log); bias: b.
  """
  logits = scale * jnp.dot(img, txt.T) + bias
  labels = 2.0 * jnp.eye(img.shape[0]) - 1.0
  pair = (valid[:, None] & valid[None, :]).astype(jnp.float32)
  n = valid.sum().astype(jnp.float32)
  return -(jax.nn.log_sigmoid(labels * logits) * pair).sum() / jnp.maximum(n, 1.0)


def clip_loss(img: jax.Array, txt: jax.Array, valid: jax.Array, scale: jax.Array) -> jax.Array:
  """CLIP's symmetric cross-entropy: the mean over valid rows of (image -> caption and
  caption -> image softmax cross-entropy) / 2, invalid rows and columns left out."""
  logits = scale * jnp.dot(img, txt.T)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(jnp.where(valid[None, :], logits, _NEG), axis=1) - diag
  t2i = jax.nn.logsumexp(jnp.where(valid[:, None], logits, _NEG), axis=0) - diag
  n = valid.sum().astype(jnp.float32)
  return (0.5 * (i2t + t2i) * valid).sum() / jnp.maximum(n, 1.0)


def retrieval_accuracy(sim: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(image -> caption, caption -> image) top-1 accuracy over the valid rows of a similarity
  matrix float[B, B]: a row is right when its own pair scores highest among the valid ones
  (ties count as right: identical captions have identical embeddings)."""
  diag = jnp.diagonal(sim)
  best_txt = jnp.where(valid[None, :], sim, -jnp.inf).max(axis=1)
  best_img = jnp.where(valid[:, None], sim, -jnp.inf).max(axis=0)
  n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
  return ((diag >= best_txt) & valid).sum() / n, ((diag >= best_img) & valid).sum() / n


# --- the towers ------------------------------------------------------------------------


class MAPHead(nn.Module):
  """Multihead attention pooling (SigLIP): a learned query attends to the tokens, then a
  residual MLP on the pooled vector. float[B, L, D] -> float[B, D]."""

  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, d = x.shape
    dtype = jnp.dtype(self.dtype)
    h = d // self.num_heads
    query = self.param("queries", sharding.partitioned(nn.initializers.normal(0.02), ("length", "embed")),
                       (1, d), jnp.float32)
    dense = lambda feats, axes, name, n_in=1: layers.Linear(  # noqa: E731
        feats, axes, num_in=n_in, use_bias=True, dtype=dtype, name=name)
    q = dense((self.num_heads, h), ("embed", "heads", "kv"), "query")(
        jnp.broadcast_to(query.astype(dtype), (b, 1, d)))
    k = dense((self.num_heads, h), ("embed", "heads", "kv"), "key")(x)
    v = dense((self.num_heads, h), ("embed", "heads", "kv"), "value")(x)
    pooled = dense((d,), ("heads", "kv", "embed"), "out", n_in=2)(layers.attend(q, k, v, None))
    y = layers.LayerNorm(self.norm_eps, dtype=dtype, name="ln")(pooled)
    pooled = pooled + layers.MLP(self.mlp_dim, act="gelu", use_bias=True, dtype=dtype, name="mlp")(y)
    return pooled[:, 0]


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """A ViT trunk and a causal text tower, projected to one embedding space.

  pool: "map" (SigLIP's attention pooling head) or "mean" (the mean of the patch features).
  loss: "siglip" or "clip". logit_scale_init: the log temperature / log logit scale at
  start (None: log 10 for siglip, log(1 / 0.07) for clip); logit_bias_init: siglip's bias.
  """

  encoder: vit_lib.ViTConfig = vit_lib.ViTConfig()
  text: decoder_lib.DecoderConfig = decoder_lib.DecoderConfig()
  embed_dim: int = 128
  pool: str = "map"
  pool_heads: int = 4
  loss: str = "siglip"
  logit_scale_init: float | None = None
  logit_bias_init: float = SIGLIP_LOGIT_BIAS
  max_logit_scale: float = 100.0  # clip: the logit scale is capped here (CLIP's 100)
  image_token_id: int = 3

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"ContrastiveConfig.loss must be one of {LOSSES}, got {self.loss!r}")
    if self.pool not in POOLS:
      raise ValueError(f"ContrastiveConfig.pool must be one of {POOLS}, got {self.pool!r}")
    if self.text.moe is not None:
      raise ValueError("the text tower is dense (DecoderConfig.moe = None)")
    if self.text.sliding_window is not None:
      raise ValueError("the text tower attends over the whole caption (DecoderConfig.sliding_window = None)")
    if self.pool == "map" and self.encoder.width % self.pool_heads:
      raise ValueError(f"encoder width {self.encoder.width} is not a multiple of pool_heads {self.pool_heads}")

  @property
  def tokens_per_image(self) -> int:
    return 1  # one `<image>` placeholder marks the image: the text tower skips it

  @property
  def initial_logit_scale(self) -> float:
    if self.logit_scale_init is not None:
      return self.logit_scale_init
    return SIGLIP_LOGIT_SCALE if self.loss == "siglip" else CLIP_LOGIT_SCALE

  def build(self) -> "Contrastive":
    return Contrastive(self)


def text_inputs(tokens: jax.Array, segment_ids: jax.Array, image_token_id: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(bool[B, T] caption tokens, int[B, T] their positions from 0, int[B] index of each row's
  last caption token (0 in a row without one))."""
  valid = (segment_ids > 0) & (tokens != image_token_id)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  last = jnp.argmax(jnp.where(valid, jnp.arange(tokens.shape[1]), -1), axis=1)
  return valid, positions, last


class Contrastive(nn.Module):
  """Parameters: encoder (the trunk MM1 takes over), image_pool (MAP only), image_proj,
  text, text_proj, logit_scale and (SigLIP) logit_bias."""

  config: ContrastiveConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.encoder.dtype)
    self.encoder = vit_lib.ViT(c.encoder, name="encoder")
    if c.pool == "map":
      self.image_pool = MAPHead(c.pool_heads, c.encoder.mlp_dim, c.encoder.norm_eps, c.encoder.dtype,
                                name="image_pool")
    self.image_proj = layers.Linear((c.embed_dim,), ("embed", None), dtype=dtype, name="image_proj")
    self.text = decoder_lib.Decoder(c.text, name="text")
    self.text_proj = layers.Linear((c.embed_dim,), ("embed", None), dtype=jnp.dtype(c.text.dtype),
                                   name="text_proj")
    scalar = lambda v: sharding.partitioned(nn.initializers.constant(v), ())  # noqa: E731
    self.logit_scale = self.param("logit_scale", scalar(c.initial_logit_scale), (), jnp.float32)
    if c.loss == "siglip":
      self.logit_bias = self.param("logit_bias", scalar(c.logit_bias_init), (), jnp.float32)

  def encode_images(self, images: jax.Array) -> jax.Array:
    """uint8[B, H, W, 3] -> float32[B, E], unit norm."""
    with sharding.encoder_axes():
      feats = self.encoder(images)  # bidirectional, as MM1 uses it
      pooled = self.image_pool(feats) if self.config.pool == "map" else feats.mean(axis=1)
      return _normalise(self.image_proj(pooled))

  def encode_text(self, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(float32[B, E] unit-norm caption embeddings, bool[B] rows that hold caption tokens)."""
    valid, positions, last = text_inputs(tokens, segment_ids, self.config.image_token_id)
    # Causal within the segment over caption tokens only; a skipped position keeps a
    # self-edge so that its (unused) softmax row is never empty.
    mask = (segment_causal_mask(segment_ids) & valid[:, None, None, :]) | jnp.eye(tokens.shape[1], dtype=bool)
    hidden, _ = self.text(self.text.embed(tokens), mask, positions, valid=valid, return_hidden=True)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return _normalise(self.text_proj(pooled)), valid.any(axis=1)

  def __call__(self, tokens, images, segment_ids, positions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(image embeddings float32[B, E], caption embeddings float32[B, E], bool[B] rows that
    hold an image and a caption)."""
    del positions  # the text tower counts positions over the caption tokens itself
    if images.shape[1] != 1:
      raise ValueError(f"the contrastive objective takes one image slot a row (MAX_IMAGES = 1, unpacked "
                       f"rows), got {images.shape[1]}")
    img = self.encode_images(images[:, 0])
    txt, has_text = self.encode_text(tokens, segment_ids)
    has_image = aim.images_present(tokens, self.config.image_token_id, self.config.tokens_per_image, 1)
    return img, txt, has_image & has_text

  def loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng  # deterministic
    c = self.config
    img, txt, valid = self(batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"])
    sim = jnp.dot(img, txt.T)  # cosine similarities over the global batch
    if c.loss == "siglip":
      scale = jnp.exp(self.logit_scale)
      loss = siglip_loss(img, txt, valid, scale, self.logit_bias)
      extra = {"logit_bias": self.logit_bias}
    else:
      # Capped at max_logit_scale in the forward pass; the gradient passes the cap unchanged
      # (CLIP clamps the parameter itself), so a scale that overshoots can come back down.
      log_scale = self.logit_scale
      log_scale = log_scale - jax.lax.stop_gradient(jax.nn.relu(log_scale - math.log(c.max_logit_scale)))
      scale = jnp.exp(log_scale)
      loss = clip_loss(img, txt, valid, scale)
      extra = {}
    i2t, t2i = retrieval_accuracy(sim, valid)
    n = valid.sum().astype(jnp.float32)
    eye = jnp.eye(sim.shape[0], dtype=bool)
    pair = valid[:, None] & valid[None, :]
    positive = (jnp.diagonal(sim) * valid).sum() / jnp.maximum(n, 1.0)
    negative = jnp.where(pair & ~eye, sim, 0.0).sum() / jnp.maximum(n * (n - 1), 1.0)
    return loss, {"loss": loss, "contrastive_loss": loss, "i2t_accuracy": i2t, "t2i_accuracy": t2i,
                  "num_pairs": n, "logit_scale": scale, "positive_similarity": positive,
                  "negative_similarity": negative, **extra}


def _normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


# Every image-encoder pre-training objective `mm1-train` takes as its model.
ImageObjectiveConfig = aim.AutoregressiveObjectiveConfig | ContrastiveConfig
