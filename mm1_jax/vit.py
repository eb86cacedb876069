"""ViT image encoders: CLIP-style, SigLIP, AIM (v1) and AIMv2 trunks in one module.

The trunks differ only in switches of `ViTConfig`:

  trunk   norm       biases           position      CLS  MLP          extra norms
  CLIP    LayerNorm  qkv/MLP          learned       yes  quick-GELU   pre-trunk + post
  SigLIP  LayerNorm  qkv/MLP/patch    learned       no   GELU (tanh)  post
  AIM     LayerNorm  patch only       2-D sin-cos   no   GELU         after patch embed + post
  AIMv2   RMSNorm    patch only       learned       no   SwiGLU       after patch embed + post

AIM and AIMv2 are built as apple/ml-aim builds them (aim-v1/aim/v1/torch/layers.py,
aim-v2/aim/v2/torch/models.py): the patch embedding is a convolution with a bias followed
by the trunk's norm (`PatchEmbed(norm_layer=...)`), attention and MLP have no biases, and
AIM's sin-cos embedding has the column (x) half first, then the row (y) half.

Any trunk can take a conv stem instead of the linear patch projection (`stem = "conv"`:
3x3 stride-2 convolutions down to the same patch grid, Xiao et al. 2021); the CPU-sized
trunks learn shapes faster with it (docs/results.md). Presets for each live in gin/encoders/. Images enter as uint8[B, H, W, 3] (or float
in [0, 1]) and are normalised here with the encoder's own mean and std, so batches
travel to the devices as bytes.

Resolution: the patch grid is fixed by `image_size`; weights trained at another grid
are brought over by `resize_pos_embed` (bicubic), which `mm1-convert --image_size`
and `train.init_from` apply.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax import layers
from mm1_jax import sharding

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # SigLIP

NORMS = ("layernorm", "rmsnorm")
POS_EMBEDS = ("learned", "sincos2d")
STEMS = ("patch", "conv")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and flavour of a ViT. Defaults are a tiny CPU-sized CLIP-style encoder."""

  image_size: int = 64
  patch_size: int = 8
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  act: str = "gelu"  # layers.activation name, or "swiglu"; "quick_gelu" for OpenAI CLIP
  norm: str = "layernorm"  # or "rmsnorm" (AIMv2)
  norm_eps: float = 1e-5
  attn_bias: bool = True
  mlp_bias: bool = True
  patch_bias: bool = False
  pos_embed: str = "learned"  # or "sincos2d" (AIM v1; fixed, not a parameter)
  # "patch": one linear map of each p x p patch (every trunk above); "conv": log2(p) 3x3
  # stride-2 convolutions (stem_width channels, doubling), each followed by the trunk's norm
  # and a GELU, then the linear map to the width (Xiao et al. 2021, "Early convolutions help
  # transformers see better"). Same patch grid and tokens; the tiny CPU trunks use it.
  stem: str = "patch"
  stem_width: int = 32
  use_cls: bool = False
  pre_norm: bool = False  # LayerNorm before the blocks (CLIP's "pre_layrnorm")
  patch_norm: bool = False  # norm right after the patch embedding (AIM, AIMv2)
  final_norm: bool = True  # norm after the trunk, applied to every token
  scan_layers: bool = True  # one nn.scan over the blocks; params get a leading 'layers' axis
  remat_policy: str = "none"  # see layers.REMAT_POLICIES
  pixel_mean: tuple[float, float, float] = CLIP_MEAN
  pixel_std: tuple[float, float, float] = CLIP_STD
  dtype: str = "float32"

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"ViTConfig.norm must be one of {NORMS}, got {self.norm!r}")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"ViTConfig.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
    if self.stem not in STEMS:
      raise ValueError(f"ViTConfig.stem must be one of {STEMS}, got {self.stem!r}")
    if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
      raise ValueError(f"a conv stem halves the image log2(patch_size) times: patch_size must be a power "
                       f"of 2, got {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")

  @property
  def grid(self) -> int:
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch_size}")
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def stem_convs(self) -> list[tuple[int, int]]:
    """The conv stem's layers as (output channels, output side in pixels); [] for "patch"."""
    if self.stem != "conv":
      return []
    n = self.patch_size.bit_length() - 1
    return [(self.stem_width * 2 ** i, -(-self.image_size // 2 ** (i + 1))) for i in range(n)]


def _norm(c: ViTConfig, name: str, axis_name: str = "embed") -> nn.Module:
  dtype = jnp.dtype(c.dtype)
  if c.norm == "rmsnorm":
    return layers.RMSNorm(c.norm_eps, dtype=dtype, axis_name=axis_name, name=name)
  return layers.LayerNorm(c.norm_eps, dtype=dtype, axis_name=axis_name, name=name)


def sincos_2d(grid: int, width: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding float32[grid * grid, width], row-major patches.

  Patch (row y, column x) is [sin(x w), cos(x w), sin(y w), cos(y w)] over width / 4
  frequencies w, the layout of AIM's `SinCosPosEmbed` (MAE's): the column half comes first.
  """
  if width % 4:
    raise ValueError(f"a 2-D sin-cos embedding needs width divisible by 4, got {width}")
  omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  ey, ex = np.outer(y.ravel(), omega), np.outer(x.ravel(), omega)
  return np.concatenate([np.sin(ex), np.cos(ex), np.sin(ey), np.cos(ey)], axis=1).astype(np.float32)


def resize_pos_embed(pos: np.ndarray, new_grid: int, num_prefix: int = 0) -> np.ndarray:
  """Bicubic resize of a learned position embedding to another patch grid.

  Args:
    pos: float[num_prefix + g * g, D] (a CLS row first when num_prefix = 1).
    new_grid: target grid side.
    num_prefix: leading rows that are not grid positions; kept as they are.
  Returns:
    float[num_prefix + new_grid ** 2, D]
  """
  pos = np.asarray(pos, np.float32)
  prefix, grid_rows = pos[:num_prefix], pos[num_prefix:]
  g = math.isqrt(grid_rows.shape[0])
  if g * g != grid_rows.shape[0]:
    raise ValueError(f"position embedding has {grid_rows.shape[0]} grid rows, not a square")
  if g == new_grid:
    return pos
  d = grid_rows.shape[1]
  resized = jax.image.resize(jnp.asarray(grid_rows.reshape(g, g, d)), (new_grid, new_grid, d),
                             method="bicubic", antialias=g > new_grid)
  return np.concatenate([prefix, np.asarray(resized).reshape(new_grid * new_grid, d)], axis=0)


def normalise_pixels(images: jax.Array, config: ViTConfig) -> jax.Array:
  """uint8 (or float in [0, 1]) [..., H, W, 3] -> float32, standardised by the encoder's mean/std."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return (x - jnp.asarray(config.pixel_mean)) / jnp.asarray(config.pixel_std)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """float[B, H, W, C] -> float[B, (H / p) * (W / p), p * p * C]: raster order, rows first."""
  b, h, w, ch = x.shape
  p = patch_size
  x = x.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * ch)


def prefix_causal_mask(num_tokens: int, prefix_lengths: jax.Array) -> jax.Array:
  """bool[B, 1, L, L]: query q sees key k when k <= q or k is in its image's prefix (AIM)."""
  idx = jnp.arange(num_tokens)
  causal = idx[None, :] <= idx[:, None]  # [q, k]
  in_prefix = idx[None, None, :] < prefix_lengths[:, None, None]  # [B, 1, k]
  return (causal[None] | in_prefix)[:, None]


class EncoderBlock(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, unused_per_layer=None
               ) -> tuple[jax.Array, None]:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h = _norm(c, "ln_attn")(x)
    h, _ = layers.Attention(c.num_heads, c.num_heads, c.width // c.num_heads, use_bias=c.attn_bias,
                            use_rope=False, dtype=dtype, name="attn")(h, mask=mask)
    x = x + h
    h = _norm(c, "ln_mlp")(x)
    x = x + layers.MLP(c.mlp_dim, act=c.act, use_bias=c.mlp_bias, dtype=dtype, name="mlp")(h)
    return sharding.constrain(x, ("batch", "length", "embed")), None


class ConvStem(nn.Module):
  """float[B, H, W, 3] -> float[B, (H / p) * (W / p), C]: 3x3 stride-2 convolutions, each
  followed by the trunk's norm and a GELU, in row-major patch order like `patchify`."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    for i, (channels, _) in enumerate(c.stem_convs):
      init = sharding.partitioned(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                  (None, None, None, "mlp"))
      x = nn.Conv(channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                  kernel_init=init, name=f"conv_{i}")(x)
      x = nn.gelu(_norm(c, f"ln_{i}", axis_name="mlp")(x), approximate=False)
    b, h, w, ch = x.shape
    return x.reshape(b, h * w, ch)


class ViT(nn.Module):
  """images: uint8|float[B, H, W, 3] -> patch features float[B, L, D] (CLS dropped)."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, prefix_lengths: jax.Array | None = None) -> jax.Array:
    """prefix_lengths: optional int[B]; when given, attention is prefix-causal (AIM pre-training)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, hgt, wid, _ = images.shape
    if (hgt, wid) != (c.image_size, c.image_size):
      raise ValueError(f"expected {c.image_size}px images, got {hgt}x{wid}")
    if c.stem == "conv":
      x = ConvStem(c, name="stem")(normalise_pixels(images, c))  # [B, grid * grid, channels]
    else:
      x = patchify(normalise_pixels(images, c), c.patch_size)  # then one linear projection
    x = layers.Linear((c.width,), ("patch", "embed"), use_bias=c.patch_bias, dtype=dtype,
                      name="patch_embed")(x)
    if c.patch_norm:
      x = _norm(c, "ln_patch")(x)
    if c.use_cls:
      cls = self.param("cls", sharding.partitioned(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.width)), x], axis=1)
    if c.pos_embed == "learned":
      pos = self.param("pos_embed",
                       sharding.partitioned(nn.initializers.normal(0.02), ("length", "embed")),
                       (x.shape[1], c.width), jnp.float32)
    else:
      pos = jnp.asarray(sincos_2d(c.grid, c.width))
      if c.use_cls:
        pos = jnp.concatenate([jnp.zeros((1, c.width)), pos])
    x = x + pos.astype(x.dtype)
    if c.pre_norm:
      x = _norm(c, "ln_pre")(x)
    mask = None
    if prefix_lengths is not None:
      if c.use_cls:
        raise ValueError("prefix-causal attention is defined for trunks without a CLS token")
      mask = prefix_causal_mask(x.shape[1], prefix_lengths)
    x, _ = layers.BlockStack(EncoderBlock, (c,), c.depth, c.scan_layers, c.remat_policy,
                             name="blocks")(x, mask, None)
    if c.final_norm:
      x = _norm(c, "ln_post")(x)
    return x[:, 1:] if c.use_cls else x
