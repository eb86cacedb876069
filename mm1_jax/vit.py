"""ViT image encoder (CLIP-style: pre-LayerNorm blocks, learned position embedding).

Images enter as uint8[B, H, W, 3] (or float in [0, 1]) and are normalised here with
the encoder's own mean and std, so batches travel to the devices as bytes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax import layers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a ViT. Defaults are a tiny CPU-sized encoder; presets live in gin/models."""

  image_size: int = 64
  patch_size: int = 8
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  act: str = "gelu"  # "quick_gelu" for OpenAI CLIP weights
  use_cls: bool = False
  norm_eps: float = 1e-5
  scan_layers: bool = True  # one nn.scan over the blocks; params get a leading 'layers' axis
  remat_policy: str = "none"  # see layers.REMAT_POLICIES
  pixel_mean: tuple[float, float, float] = CLIP_MEAN
  pixel_std: tuple[float, float, float] = CLIP_STD
  dtype: str = "float32"

  @property
  def grid(self) -> int:
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch_size}")
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


class EncoderBlock(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, unused_per_layer=None) -> tuple[jax.Array, None]:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h = layers.LayerNorm(c.norm_eps, dtype=dtype, name="ln_attn")(x)
    h, _ = layers.Attention(c.num_heads, c.num_heads, c.width // c.num_heads, use_bias=True,
                            use_rope=False, dtype=dtype, name="attn")(h, mask=None)
    x = x + h
    h = layers.LayerNorm(c.norm_eps, dtype=dtype, name="ln_mlp")(x)
    x = x + layers.MLP(c.mlp_dim, act=c.act, use_bias=True, dtype=dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class ViT(nn.Module):
  """images: uint8|float[B, H, W, 3] -> patch features float[B, L, D] (CLS dropped)."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, hgt, wid, ch = images.shape
    if (hgt, wid) != (c.image_size, c.image_size):
      raise ValueError(f"expected {c.image_size}px images, got {hgt}x{wid}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x / 255.0
    x = (x - jnp.asarray(c.pixel_mean)) / jnp.asarray(c.pixel_std)

    # Patchify: [B, g, p, g, p, C] -> [B, g*g, p*p*C], then one linear projection.
    p, g = c.patch_size, c.grid
    x = x.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * ch)
    x = layers.Linear((c.width,), ("patch", "embed"), dtype=dtype, name="patch_embed")(x)
    if c.use_cls:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.width)), x], axis=1)
    pos = self.param("pos_embed",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                     (x.shape[1], c.width), jnp.float32)
    x = x + pos.astype(x.dtype)
    if c.use_cls:  # CLIP has a pre-LayerNorm before the blocks.
      x = layers.LayerNorm(c.norm_eps, dtype=dtype, name="ln_pre")(x)
    x, _ = layers.BlockStack(EncoderBlock, (c,), c.depth, c.scan_layers, c.remat_policy,
                             name="blocks")(x, None)
    x = layers.LayerNorm(c.norm_eps, dtype=dtype, name="ln_post")(x)
    return x[:, 1:] if c.use_cls else x
