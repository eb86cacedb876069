"""Vision-language connector: the C-Abstractor (Honeybee), MM1's final choice.

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


@dataclasses.dataclass(frozen=True)
class CAbstractorConfig:
  num_tokens: int = 16  # Q; MM1 uses 144 (12 x 12)
  hidden: int = 128  # MM1 / Honeybee: 1024
  depth: int = 1  # blocks per stage; MM1 / Honeybee: 3
  se_ratio: float = 0.25
  dtype: str = "float32"

  @property
  def pooled_grid(self) -> int:
    s = math.isqrt(self.num_tokens)
    if s * s != self.num_tokens:
      raise ValueError(f"num_tokens must be a square, got {self.num_tokens}")
    return s


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
      init = nn.with_logical_partitioning(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
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
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"C-Abstractor needs a square patch grid, got {n} patches")
    pos = self.param("pos_embed",
                     nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                  ("length", "embed")), (n, d), jnp.float32)
    x = (features + pos.astype(features.dtype)).reshape(b, side, side, d)
    for i in range(c.depth):
      x = RegNetBlock(c.hidden, c.se_ratio, dtype, name=f"stage1_{i}")(x)
    x = adaptive_avg_pool2d(x, c.pooled_grid)
    for i in range(c.depth):
      x = RegNetBlock(c.hidden, c.se_ratio, dtype, name=f"stage2_{i}")(x)
    x = x.reshape(b, c.num_tokens, c.hidden)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="readout_1")(x)
    x = nn.silu(x)
    x = layers.Linear((self.out_dim,), ("mlp", "embed"), use_bias=True, dtype=dtype, name="readout_2")(x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
