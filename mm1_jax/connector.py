"""Vision-language connectors: patch features [B, L, D_enc] -> image tokens [B, Q, d_llm].

MM1 compares three (Sec. 3.2 of the paper) and picks the C-Abstractor; all are here,
plus the usual baselines. Every connector is a `ConnectorConfig`: a frozen dataclass
that builds its module (`build(out_dim)`), says how many image tokens it gives
(`tokens(num_patches)`) and counts its forward FLOPs (`forward_flops`, used for MFU).
gin chooses one by binding `model.MM1Config.connector` (gin/connectors/<name>.gin):

  c_abstractor    CAbstractorConfig    convolutional abstractor (Honeybee), Q = any square
  avg_pool        AvgPoolConfig        adaptive n x n average pool + Linear, Q = n * n
  attention_pool  AttentionPoolConfig  Q learnable queries cross-attending to the patches + Linear
  linear          LinearConfig         one Linear per patch, Q = L (no reduction)
  mlp             MLPConfig            Linear, GELU, Linear per patch (LLaVA-1.5), Q = L
  pixel_shuffle   PixelShuffleConfig   r x r neighbours concatenated, LayerNorm + MLP, Q = L / r^2

A new connector is one `ConnectorConfig` subclass (with its module), one gin file
gin/connectors/<name>.gin binding it, and one entry in `CONNECTORS`; the tests run every
entry (shapes, FLOPs against XLA, a train step, its gin file).

C-Abstractor:
  patch features [B, L, D_enc] (+ learned position embedding)
    -> grid [B, h, w, D_enc] -> `depth` RegNet blocks (D_enc -> hidden)
    -> adaptive average pool to s x s (s = sqrt(num_tokens))
    -> `depth` RegNet blocks (hidden -> hidden)
    -> [B, Q, hidden] -> Linear(hidden -> d_llm), SiLU, Linear(d_llm -> d_llm)
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


class ConnectorConfig:
  """Base of every connector config (subclasses are frozen dataclasses)."""

  num_tokens: int | None  # image tokens Q; None: one per patch

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    """The connector module: float[B, L, D_enc] -> float[B, Q, out_dim]."""
    raise NotImplementedError

  def tokens(self, num_patches: int) -> int:
    """Q for an encoder of `num_patches` patches."""
    return self.num_tokens or num_patches

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    """Matmul and convolution FLOPs (2 per multiply-add) of one image's forward pass."""
    raise NotImplementedError


def _pool_flops(num_patches: int, side: int, channels: int) -> float:
  """`adaptive_avg_pool2d` from a sqrt(num_patches)-square grid to side x side: two
  matmuls with the pooling matrices (rows, then columns)."""
  n = math.isqrt(num_patches)
  return 2.0 * channels * (side * n * n + side * side * n)


def _linear_flops(tokens: int, *dims: int) -> float:
  """A chain of Linear layers dims[0] -> dims[1] -> ... applied to `tokens` tokens."""
  return 2.0 * tokens * sum(a * b for a, b in zip(dims, dims[1:]))


@dataclasses.dataclass(frozen=True)
class CAbstractorConfig(ConnectorConfig):
  num_tokens: int = 16  # Q; MM1 uses 144 (12 x 12)
  hidden: int = 128  # MM1 / Honeybee: 1024
  depth: int = 1  # blocks per stage; MM1 / Honeybee: 3
  se_ratio: float = 0.25
  dtype: str = "float32"

  @property
  def pooled_grid(self) -> int:
    return _square_side(self.num_tokens)

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return CAbstractor(self, out_dim, name=name)

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    def block(cells: int, cin: int) -> float:  # a RegNetBlock (squeeze-excite left out: per image)
      c = self.hidden
      macs = cin * c + 9 * c + c * c + (cin * c if cin != c else 0)
      return 2.0 * cells * macs
    stage1 = sum(block(num_patches, in_dim if i == 0 else self.hidden) for i in range(self.depth))
    stage2 = self.depth * block(self.num_tokens, self.hidden)
    pool = _pool_flops(num_patches, self.pooled_grid, self.hidden)
    return stage1 + pool + stage2 + _linear_flops(self.num_tokens, self.hidden, out_dim, out_dim)


def _square_side(num_tokens: int) -> int:
  s = math.isqrt(num_tokens)
  if s * s != num_tokens:
    raise ValueError(f"num_tokens must be a square, got {num_tokens}")
  return s


def to_grid(features: jax.Array, who: str) -> jax.Array:
  """float[B, L, D] with L a square -> float[B, sqrt(L), sqrt(L), D]."""
  b, n, d = features.shape
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"{who} needs a square patch grid, got {n} patches")
  return features.reshape(b, side, side, d)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float[n_out, n_in] averaging weights, bin edges as torch's adaptive_avg_pool."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)  # ceil
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool2d(x: jax.Array, size: int) -> jax.Array:
  """x: float[B, h, w, C] -> float[B, size, size, C]."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], size), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)


class RegNetBlock(nn.Module):
  """RegNet bottleneck (stride 1, bottleneck ratio 1, depthwise 3x3, squeeze-excite)."""

  features: int
  se_ratio: float = 0.25
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    c = self.features
    ln = lambda name: layers.LayerNorm(1e-6, dtype=self.dtype, axis_name="mlp", name=name)  # noqa: E731

    def conv(feats, kernel, name, groups=1, in_axis=None):
      # Kernels are [kh, kw, C_in, C_out]; only C_out is sharded unless C_in is the ViT width.
      init = sharding.partitioned(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                          (None, None, in_axis, "mlp"))
      return nn.Conv(feats, (kernel, kernel), padding="SAME", feature_group_count=groups,
                     use_bias=False, dtype=self.dtype, kernel_init=init, name=name)

    h = nn.silu(ln("ln1")(conv(c, 1, "conv1", in_axis="embed" if cin != c else None)(x)))
    h = nn.silu(ln("ln2")(conv(c, 3, "conv2", groups=c)(h)))
    # Squeeze-excite; reduced width from the block input, as timm's RegNet does.
    rd = max(1, round(cin * self.se_ratio))
    s = jnp.mean(h, axis=(1, 2))
    s = nn.silu(layers.Linear((rd,), ("mlp", None), use_bias=True, dtype=self.dtype, name="se_reduce")(s))
    s = jax.nn.sigmoid(layers.Linear((c,), (None, "mlp"), use_bias=True, dtype=self.dtype,
                                     name="se_expand")(s))
    h = h * s[:, None, None, :]
    h = ln("ln3")(conv(c, 1, "conv3")(h))
    shortcut = x
    if cin != c:
      shortcut = ln("ln_shortcut")(conv(c, 1, "shortcut", in_axis="embed")(x))
    return nn.silu(h + shortcut)


class CAbstractor(nn.Module):
  """features: float[B, L, D_enc] (L a square) -> image tokens float[B, Q, d_llm]."""

  config: CAbstractorConfig
  out_dim: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, n, d = features.shape
    pos = self.param("pos_embed",
                     sharding.partitioned(nn.initializers.truncated_normal(0.02),
                                                  ("length", "embed")), (n, d), jnp.float32)
    x = to_grid(features + pos.astype(features.dtype), "the C-Abstractor")
    for i in range(c.depth):
      x = RegNetBlock(c.hidden, c.se_ratio, dtype, name=f"stage1_{i}")(x)
    x = adaptive_avg_pool2d(x, c.pooled_grid)
    for i in range(c.depth):
      x = RegNetBlock(c.hidden, c.se_ratio, dtype, name=f"stage2_{i}")(x)
    x = x.reshape(b, c.num_tokens, c.hidden)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="readout_1")(x)
    x = nn.silu(x)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="readout_2")(x)
    return sharding.constrain(x, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class AvgPoolConfig(ConnectorConfig):
  num_tokens: int = 16  # n * n
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return AvgPoolProjector(self, out_dim, name=name)

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    pool = _pool_flops(num_patches, _square_side(self.num_tokens), in_dim)
    return pool + _linear_flops(self.num_tokens, in_dim, out_dim)


class AvgPoolProjector(nn.Module):
  """features: float[B, L, D_enc] (L a square) -> adaptive n x n average pool -> Linear."""

  config: AvgPoolConfig
  out_dim: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    b, _, d = features.shape
    s = _square_side(self.config.num_tokens)
    x = adaptive_avg_pool2d(to_grid(features, "average pooling"), s).reshape(b, s * s, d)
    dtype = jnp.dtype(self.config.dtype)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj")(x)
    return sharding.constrain(x, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class AttentionPoolConfig(ConnectorConfig):
  num_tokens: int = 16  # k learnable queries (MM1 tried 64 and 144)
  num_heads: int = 8
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return AttentionPool(self, out_dim, name=name)

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    q, n, d = self.num_tokens, num_patches, in_dim
    projections = _linear_flops(q, d, d) * 2 + _linear_flops(n, d, d) * 2  # query, out; key, value
    attention = 2.0 * 2 * q * n * d  # scores and the weighted sum
    return projections + attention + _linear_flops(q, d, out_dim)


class AttentionPool(nn.Module):
  """k learnable queries attend (multi-head) over the patch features; then LayerNorm + Linear."""

  config: AttentionPoolConfig
  out_dim: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, _, d = features.shape
    if d % c.num_heads:
      raise ValueError(f"encoder width {d} is not a multiple of num_heads {c.num_heads}")
    h = d // c.num_heads
    queries = self.param("queries", sharding.partitioned(nn.initializers.normal(0.02),
                                                                 ("length", "embed")),
                         (c.num_tokens, d), jnp.float32)
    kv = layers.LayerNorm(1e-6, dtype=dtype, name="ln_kv")(features)
    dense = lambda feats, axes, name, n_in=1: layers.Linear(
        feats, axes, num_in=n_in, use_bias=True, dtype=dtype, name=name)
    q = dense((c.num_heads, h), ("embed", "heads", "kv"), "query")(
        jnp.broadcast_to(queries.astype(dtype), (b, c.num_tokens, d)))
    k = dense((c.num_heads, h), ("embed", "heads", "kv"), "key")(kv)
    v = dense((c.num_heads, h), ("embed", "heads", "kv"), "value")(kv)
    x = jax.nn.dot_product_attention(q, k, v)
    x = dense((d,), ("heads", "kv", "embed"), "out", n_in=2)(x)
    x = layers.LayerNorm(1e-6, dtype=dtype, name="ln_out")(x)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj")(x)
    return sharding.constrain(x, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class LinearConfig(ConnectorConfig):
  num_tokens: int | None = None  # None: one per patch (no reduction); if set, must equal the patches
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return PatchProjector(self.num_tokens, out_dim, hidden_layers=0, dtype=self.dtype, name=name)

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    return _linear_flops(num_patches, in_dim, out_dim)


@dataclasses.dataclass(frozen=True)
class MLPConfig(ConnectorConfig):
  num_tokens: int | None = None  # None: one per patch (no reduction); if set, must equal the patches
  act: str = "gelu_exact"
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return PatchProjector(self.num_tokens, out_dim, hidden_layers=1, act=self.act, dtype=self.dtype,
                          name=name)

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    return _linear_flops(num_patches, in_dim, out_dim, out_dim)


class PatchProjector(nn.Module):
  """Per-patch Linear (hidden_layers=0) or Linear-act-Linear (1): one image token per patch."""

  num_tokens: int | None
  out_dim: int
  hidden_layers: int = 0
  act: str = "gelu_exact"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    if self.num_tokens is not None and features.shape[1] != self.num_tokens:
      raise ValueError(f"a per-patch projector gives one token per patch: num_tokens must be "
                       f"{features.shape[1]} (the encoder's patches), got {self.num_tokens}")
    dtype = jnp.dtype(self.dtype)
    x = features
    for i in range(self.hidden_layers):
      x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name=f"hidden_{i}")(x)
      x = layers.activation(self.act)(x)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj")(x)
    return sharding.constrain(x, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class PixelShuffleConfig(ConnectorConfig):
  """Space-to-depth (InternVL, Idefics3): each factor x factor block of neighbouring patches
  becomes one token of factor^2 x D_enc channels, then LayerNorm, Linear, GELU, Linear.
  Q = L / factor^2: a 24 x 24 grid (ViT-L/14 at 336 px) gives 144 tokens at factor 2."""
  factor: int = 2
  num_tokens: int | None = None  # None: L / factor^2; if set, must equal it
  act: str = "gelu_exact"
  dtype: str = "float32"

  def tokens(self, num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches or side % self.factor:
      raise ValueError(f"pixel shuffle needs a square patch grid whose side divides by factor {self.factor}, "
                       f"got {num_patches} patches (ViT-H/14 at 378 px: 27 x 27, use factor 3)")
    return num_patches // self.factor ** 2

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return PixelShuffle(self, out_dim, name=name)

  def forward_flops(self, num_patches: int, in_dim: int, out_dim: int) -> float:
    return _linear_flops(self.tokens(num_patches), self.factor ** 2 * in_dim, out_dim, out_dim)


class PixelShuffle(nn.Module):
  """features: float[B, L, D_enc] (L a square) -> float[B, L / r^2, d_llm], r = factor."""

  config: PixelShuffleConfig
  out_dim: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    c, r = self.config, self.config.factor
    x = to_grid(features, "pixel shuffle")
    b, n, _, d = x.shape
    if n % r:
      raise ValueError(f"pixel shuffle: the {n} x {n} patch grid does not divide by factor {r}")
    if c.num_tokens is not None and c.num_tokens != (n // r) ** 2:
      raise ValueError(f"pixel shuffle gives (grid / factor)^2 = {(n // r) ** 2} tokens, "
                       f"num_tokens is {c.num_tokens}")
    # [B, n/r, r, n/r, r, D] -> [B, n/r, n/r, r, r, D]: neighbours side by side in channels.
    x = x.reshape(b, n // r, r, n // r, r, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, (n // r) ** 2, r * r * d)
    dtype = jnp.dtype(c.dtype)
    x = layers.LayerNorm(1e-6, dtype=dtype, axis_name="mlp", name="ln")(x)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="hidden")(x)
    x = layers.activation(c.act)(x)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj")(x)
    return sharding.constrain(x, ("batch", "length", "embed"))


# name (its gin file: gin/connectors/<name>.gin) -> config class
CONNECTORS: dict[str, type[ConnectorConfig]] = {
    "c_abstractor": CAbstractorConfig,
    "avg_pool": AvgPoolConfig,
    "attention_pool": AttentionPoolConfig,
    "linear": LinearConfig,
    "mlp": MLPConfig,
    "pixel_shuffle": PixelShuffleConfig,
}
