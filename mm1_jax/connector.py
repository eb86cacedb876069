"""Vision-language connectors: patch features [B, L, D_enc] -> image tokens [B, Q, d_llm].

MM1 compares three (Sec. 3.2 of the paper) and picks the C-Abstractor; all are here,
plus the two usual baselines. Each config's `build(out_dim)` gives its module, so gin
chooses the connector by binding `model.MM1Config.connector`:

  CAbstractorConfig    convolutional abstractor (Honeybee), Q = any square
  AvgPoolConfig        adaptive n x n average pool + Linear, Q = n * n
  AttentionPoolConfig  Q learnable queries cross-attending to the patches + Linear
  LinearConfig         one Linear per patch, Q = L (no reduction)
  MLPConfig            Linear, GELU, Linear per patch (LLaVA-1.5), Q = L

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


class _Buildable:
  """Connector configs build their module: `config.build(out_dim)` (see `_MODULES`)."""

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return _MODULES[type(self)](self, out_dim, name=name)


@dataclasses.dataclass(frozen=True)
class CAbstractorConfig(_Buildable):
  num_tokens: int = 16  # Q; MM1 uses 144 (12 x 12)
  hidden: int = 128  # MM1 / Honeybee: 1024
  depth: int = 1  # blocks per stage; MM1 / Honeybee: 3
  se_ratio: float = 0.25
  dtype: str = "float32"

  @property
  def pooled_grid(self) -> int:
    return _square_side(self.num_tokens)


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
class AvgPoolConfig(_Buildable):
  num_tokens: int = 16  # n * n
  dtype: str = "float32"


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
class AttentionPoolConfig(_Buildable):
  num_tokens: int = 16  # k learnable queries (MM1 tried 64 and 144)
  num_heads: int = 8
  dtype: str = "float32"


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
class LinearConfig:
  num_tokens: int | None = None  # None: one per patch (no reduction); if set, must equal the patches
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return PatchProjector(self.num_tokens, out_dim, hidden_layers=0, dtype=self.dtype, name=name)


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  num_tokens: int | None = None  # None: one per patch (no reduction); if set, must equal the patches
  act: str = "gelu_exact"
  dtype: str = "float32"

  def build(self, out_dim: int, name: str | None = None) -> nn.Module:
    return PatchProjector(self.num_tokens, out_dim, hidden_layers=1, act=self.act, dtype=self.dtype,
                          name=name)


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


_MODULES = {CAbstractorConfig: CAbstractor, AvgPoolConfig: AvgPoolProjector, AttentionPoolConfig: AttentionPool}
ConnectorConfig = CAbstractorConfig | AvgPoolConfig | AttentionPoolConfig | LinearConfig | MLPConfig
