"""Image-encoder pre-training: the AIM (v1) and AIMv2 objectives.

MM1's image encoder is pre-trained on its own before the multimodal stage. Both
objectives here train a `vit.ViT` trunk that MM1 then takes over through
`train.init_from = ["<run>/checkpoints:encoder"]` (the trunk's parameters only; a
learned position embedding is resized bicubically when the resolution changes).

AIM (v1), autoregressive image model (El-Nouby et al. 2024, section 3; trunk as
apple/ml-aim's aim-v1):
  image -> patches in raster order -> patch embedding + LayerNorm + 2-D sin-cos positions
  -> ViT with prefix-causal attention (a prefix of random length attends bidirectionally,
  the rest causally) -> + the same sin-cos positions again -> pixel head (residual MLP
  blocks, dropped after pre-training) -> at patch i, a prediction of patch i + 1.
  Loss: mean squared error against per-patch-normalised pixels, on the patches after
  the prefix only (inside the prefix the trunk has seen the patch it would predict).

AIMv2, multimodal autoregressive pre-training (Fini et al. 2024, section 2; trunk as
apple/ml-aim's aim-v2):
  image -> prefix-causal ViT (RMSNorm, SwiGLU) -> per-patch linear projection -> a causal
  decoder over [image patches; caption tokens] (the placeholders of an MM1 batch, one per
  patch) -> two linear heads on the decoder's final states: next-token logits on the
  caption and, at every image position, the next patch's pixels.
  Loss: caption cross-entropy + pixel_weight x pixel regression (non-prefix patches).

Both models take MM1's batch (tokens, targets, loss_weights, segment_ids, positions,
images) so the loader, the sharded train step, checkpoints and the preflight compile
are shared; each has a `loss(batch, rng)` method that the train step calls. The rng
draws the prefix lengths, one per image, uniformly in [min_prefix, max_prefix].

After pre-training the trunk attends bidirectionally (MM1, `mm1-probe`): prefix
attention in pre-training is what makes that work without a gap between the two.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax import connector as connector_lib
from mm1_jax import decoder as decoder_lib
from mm1_jax import layers
from mm1_jax import sharding
from mm1_jax import vit as vit_lib
from mm1_jax.model import cross_entropy, segment_causal_mask, splice_images


# --- targets, prefixes, the pixel loss ---------------------------------------------


def patch_targets(images: jax.Array, config: vit_lib.ViTConfig, eps: float = 1e-6) -> jax.Array:
  """Regression targets float32[B, L, p * p * 3]: each patch of the image as the encoder
  sees it (mean/std-standardised), normalised by its own mean and variance."""
  x = vit_lib.patchify(vit_lib.normalise_pixels(images, config), config.patch_size)
  mean = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def sample_prefix_lengths(rng: jax.Array, num_images: int, num_patches: int, min_prefix: int = 1,
                          max_prefix: int | None = None) -> jax.Array:
  """int32[num_images], uniform in [min_prefix, max_prefix] (default: num_patches - 1)."""
  hi = num_patches - 1 if max_prefix is None else max_prefix
  if not 0 <= min_prefix <= hi < num_patches:
    raise ValueError(f"prefix lengths must satisfy 0 <= min_prefix <= max_prefix < {num_patches} "
                     f"patches, got [{min_prefix}, {hi}]")
  return jax.random.randint(rng, (num_images,), min_prefix, hi + 1, dtype=jnp.int32)


def next_patch_weights(prefix_lengths: jax.Array, num_patches: int) -> jax.Array:
  """float32[B, L]: 1 at output positions whose prediction is scored.

  The output at position i predicts patch i + 1; it counts when that patch lies after
  the prefix (i + 1 >= prefix) and exists (i + 1 < L).
  """
  target = jnp.arange(num_patches)[None, :] + 1
  return ((target >= prefix_lengths[:, None]) & (target < num_patches)).astype(jnp.float32)


def next_patch_loss(predictions: jax.Array, targets: jax.Array, weights: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Weighted mean over scored positions of the per-patch mean squared error.

  Args:
    predictions: float[B, L, P], position i predicting patch i + 1.
    targets: float[B, L, P] (`patch_targets`).
    weights: float[B, L] (`next_patch_weights`, times 0 for empty image slots).
  Returns:
    (loss, number of scored patches)
  """
  err = jnp.square(predictions[:, :-1].astype(jnp.float32) - targets[:, 1:]).mean(-1)
  w = weights[:, :-1]
  n = w.sum()
  return (err * w).sum() / jnp.maximum(n, 1.0), n


def images_present(tokens: jax.Array, image_token_id: int, tokens_per_image: int, slots: int) -> jax.Array:
  """bool[B * N]: which image slots hold an image (a row's images fill its first slots)."""
  count = (tokens == image_token_id).sum(axis=1) // tokens_per_image  # [B]
  return (jnp.arange(slots)[None, :] < count[:, None]).reshape(-1)


def _draw_prefixes(config, batch: dict, rng: jax.Array) -> jax.Array:
  """One prefix length per image slot of the batch, int32[B * N]."""
  b, n = batch["images"].shape[:2]
  return sample_prefix_lengths(rng, b * n, config.encoder.num_patches, config.min_prefix, config.max_prefix)


def _pixel_loss(config, batch: dict, prefix: jax.Array, predictions: jax.Array):
  """(next-patch loss, scored patches, bool[B * N] slots holding an image) of an AIM or
  AIMv2 config's predictions float[B * N, L, P] for the batch's images."""
  images = batch["images"]
  b, n = images.shape[:2]
  num_patches = config.encoder.num_patches
  targets = patch_targets(images.reshape((b * n,) + images.shape[2:]), config.encoder)
  present = images_present(batch["tokens"], config.image_token_id, num_patches, n)
  loss, scored = next_patch_loss(predictions, targets, next_patch_weights(prefix, num_patches) * present[:, None])
  return loss, scored, present


# --- the pixel head ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PixelHeadConfig:
  """Residual MLP blocks on each position's features, then a linear map to p * p * 3 pixels.

  AIM's head is "heavy" (many MLP blocks) so that the trunk's last layers keep general
  features instead of specialising in pixels; its exact size is a choice here.
  """

  width: int = 256
  depth: int = 2
  mlp_ratio: int = 4
  norm_eps: float = 1e-6
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return PixelHead(self, out_dim, name=name)


@dataclasses.dataclass(frozen=True)
class LinearHeadConfig:
  """One linear map from each position's features to p * p * 3 pixels (AIMv2's image head:
  "separate linear layers" for the image and the text outputs of the decoder)."""

  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return layers.Linear((out_dim,), ("embed", "patch"), use_bias=False, dtype=jnp.dtype(self.dtype), name=name)


class PixelHead(nn.Module):
  config: PixelHeadConfig
  out_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    x = layers.Linear((c.width,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj_in")(x)
    for i in range(c.depth):
      h = layers.LayerNorm(c.norm_eps, dtype=dtype, name=f"ln_{i}")(x)
      x = x + layers.MLP(c.width * c.mlp_ratio, act="gelu_exact", use_bias=True, dtype=dtype,
                         name=f"mlp_{i}")(h)
    x = layers.LayerNorm(c.norm_eps, dtype=dtype, name="ln_out")(x)
    return layers.Linear((self.out_dim,), ("embed", "patch"), use_bias=True, dtype=dtype, name="proj_out")(x)


# --- AIM (v1) ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AIMConfig:
  encoder: vit_lib.ViTConfig = vit_lib.ViTConfig()
  head: PixelHeadConfig = PixelHeadConfig()
  min_prefix: int = 1
  max_prefix: int | None = None  # None: num_patches - 1
  image_token_id: int = 3  # the batch's `<image>` placeholders (one per patch) mark the images

  def __post_init__(self):
    if self.encoder.use_cls:
      raise ValueError("AIM pre-trains trunks without a CLS token (ViTConfig.use_cls = False)")

  @property
  def tokens_per_image(self) -> int:
    return self.encoder.num_patches

  def build(self) -> "AIM":
    return AIM(self)


class AIM(nn.Module):
  """Parameters: encoder (the trunk MM1 takes over) and head (dropped after pre-training)."""

  config: AIMConfig

  def setup(self):
    c = self.config
    self.encoder = vit_lib.ViT(c.encoder, name="encoder")
    self.head = c.head.build(c.encoder.patch_size ** 2 * 3, name="head")

  def __call__(self, tokens, images, segment_ids, positions, prefix_lengths=None) -> jax.Array:
    """Next-patch predictions float[B * N, L, p * p * 3] for every image slot."""
    del tokens, segment_ids, positions  # the images are the whole input
    b, n = images.shape[:2]
    e = self.config.encoder
    with sharding.encoder_axes():
      feats = self.encoder(images.reshape((b * n,) + images.shape[2:]), prefix_lengths)
      # AIM adds the sin-cos positions "before the transformer and before the MLP head":
      # the head sees each patch on its own, and this tells it where the patch is.
      pos = jnp.asarray(vit_lib.sincos_2d(e.grid, e.width))
      return self.head(feats + pos.astype(feats.dtype))

  def loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    prefix = _draw_prefixes(self.config, batch, rng)
    predictions = self(batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"], prefix)
    loss, scored, present = _pixel_loss(self.config, batch, prefix, predictions)
    return loss, {"loss": loss, "pixel_loss": loss, "num_patches": scored,
                  "num_images": present.sum().astype(jnp.float32)}


# --- AIMv2 -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AIMv2Config:
  """A prefix-causal trunk, a per-patch projection and a causal multimodal decoder.

  The connector must keep one token per patch (`connector.LinearConfig` or `MLPConfig`):
  the decoder's image positions are the patches whose successors it predicts. The pixel
  head is linear, as in the paper; `PixelHeadConfig` (residual MLP blocks) is an option.
  """

  encoder: vit_lib.ViTConfig = vit_lib.ViTConfig()
  connector: connector_lib.LinearConfig | connector_lib.MLPConfig = connector_lib.LinearConfig()
  decoder: decoder_lib.DecoderConfig = decoder_lib.DecoderConfig()
  head: LinearHeadConfig | PixelHeadConfig = LinearHeadConfig()
  # alpha of the paper's L = L_text + alpha x L_img; its value is not published in a source
  # checked here, so 1.0 is a choice (docs/sft_and_encoders.md).
  pixel_weight: float = 1.0
  min_prefix: int = 1
  max_prefix: int | None = None
  image_token_id: int = 3

  def __post_init__(self):
    if self.encoder.use_cls:
      raise ValueError("AIMv2 pre-trains trunks without a CLS token (ViTConfig.use_cls = False)")
    if not isinstance(self.connector, (connector_lib.LinearConfig, connector_lib.MLPConfig)):
      raise ValueError(f"AIMv2 needs one decoder position per patch: connector must be LinearConfig or "
                       f"MLPConfig, got {type(self.connector).__name__}")
    if self.decoder.moe is not None:
      raise ValueError("AIMv2's decoder is dense (DecoderConfig.moe = None)")

  @property
  def tokens_per_image(self) -> int:
    return self.encoder.num_patches

  def build(self) -> "AIMv2":
    return AIMv2(self)


class AIMv2(nn.Module):
  """Parameters: encoder (the trunk MM1 takes over), connector, decoder, pixel_head."""

  config: AIMv2Config

  def setup(self):
    c = self.config
    self.encoder = vit_lib.ViT(c.encoder, name="encoder")
    self.connector = c.connector.build(out_dim=c.decoder.width, name="connector")
    self.decoder = decoder_lib.Decoder(c.decoder, name="decoder")
    self.pixel_head = c.head.build(c.encoder.patch_size ** 2 * 3, name="pixel_head")

  def __call__(self, tokens, images, segment_ids, positions, prefix_lengths=None
               ) -> tuple[jax.Array, jax.Array]:
    """(caption logits float32[B, T, V], next-patch predictions float[B * N, L, p * p * 3])."""
    c = self.config
    b, n = images.shape[:2]
    q = c.tokens_per_image
    with sharding.encoder_axes():
      feats = self.encoder(images.reshape((b * n,) + images.shape[2:]), prefix_lengths)
      image_emb = self.connector(feats).reshape(b, n * q, c.decoder.width)
    is_image = tokens == c.image_token_id
    x = splice_images(self.decoder.embed(tokens), image_emb, is_image)
    window = c.decoder.sliding_window  # as MM1: the einsum and splash paths apply the same window
    hidden, _ = self.decoder(x, segment_causal_mask(segment_ids, window), positions, valid=segment_ids > 0,
                             return_hidden=True, segment_ids=segment_ids)
    # The hidden states at the image positions, image by image, patch by patch (a stable
    # sort puts a row's placeholder positions first, in sequence order).
    order = jnp.argsort(~is_image, axis=1, stable=True)[:, :n * q]
    if order.shape[1] < n * q:  # a row too short for its slots (parameter init): those are unscored
      order = jnp.pad(order, ((0, 0), (0, n * q - order.shape[1])))
    image_hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    pixels = self.pixel_head(image_hidden.reshape(b * n, q, hidden.shape[-1]))
    return self.decoder.logits(hidden), pixels

  def loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    c = self.config
    prefix = _draw_prefixes(c, batch, rng)
    logits, pixels = self(batch["tokens"], batch["images"], batch["segment_ids"], batch["positions"], prefix)
    caption_loss, metrics = cross_entropy(logits, batch["targets"], batch["loss_weights"])
    pixel_loss, scored, _ = _pixel_loss(c, batch, prefix, pixels)
    loss = caption_loss + c.pixel_weight * pixel_loss
    metrics.update(loss=loss, caption_loss=caption_loss, pixel_loss=pixel_loss, num_patches=scored)
    return loss, metrics


AutoregressiveObjectiveConfig = AIMConfig | AIMv2Config  # with the contrastive one: contrastive.ImageObjectiveConfig
