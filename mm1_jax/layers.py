"""Building blocks shared by the image encoder, the connector and the decoder.

Every parameter is created with logical axis names (see `mm1_jax.sharding` for the
names and the rules that map them onto mesh axes). Dimension letters used in
shape comments:

  B: batch            T: query length          S: key length
  D: model width      F: MLP hidden width      V: vocabulary
  N: query heads      K: key/value heads       H: head dim
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax import sharding
from mm1_jax import splash

Dtype = jnp.dtype
Initializer = Callable[..., jax.Array]

default_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _prod(xs: Sequence[int]) -> int:
  return int(math.prod(xs))


class Linear(nn.Module):
  """A dense layer over the trailing `len(in_axes)` dims, computed as one 2-D matmul.

  Leading (token) dims are flattened before the matmul so that the weight gradient
  contracts a single dimension; on CPU this made the train step ~1.4x faster than
  a batched einsum, and on TPU/GPU it lowers to the same dot_general.

  Attributes:
    features: output feature shape, e.g. (num_heads, head_dim).
    axes: logical axis names of the kernel, input names first then output names.
    num_in: how many trailing input dims are contracted.
  """

  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  num_in: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[-self.num_in:]
    fan_in = _prod(in_shape)
    kernel_shape = tuple(in_shape) + tuple(self.features)
    assert len(self.axes) == len(kernel_shape), (self.axes, kernel_shape)

    def init(key, shape, dtype):
      # Initialise as a 2-D (fan_in, fan_out) matrix so variance scaling sees the right fans.
      w = self.kernel_init(key, (fan_in, _prod(self.features)), dtype)
      return w.reshape(shape)

    kernel = self.param("kernel", sharding.partitioned(init, self.axes),
                        kernel_shape, self.param_dtype)
    # One dot_general over the trailing num_in dims, no reshape to a matrix: a reshape fixes
    # the activations' physical order, and when the producer or consumer wants another (the
    # attention kernel's heads-major layout) the compiler must copy them to and fro.
    x = jnp.asarray(x, self.dtype)
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
    y = jax.lax.dot_general(x, jnp.asarray(kernel, self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", sharding.partitioned(nn.initializers.zeros,
                                                             self.axes[self.num_in:]),
                        tuple(self.features), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class RMSNorm(nn.Module):
  """Root-mean-square norm; statistics in float32 whatever the compute dtype."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", sharding.partitioned(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Statistics in float32, the scaling in the compute dtype (as Llama's reference does):
    # in bfloat16 no float32 [B, T, D] product is written, in the forward or the scale's gradient.
    return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with logically partitioned scale and bias; statistics in float32."""

  eps: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", sharding.partitioned(nn.initializers.ones,
                                                             (self.axis_name,)), (d,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
    if self.use_bias:
      bias = self.param("bias", sharding.partitioned(nn.initializers.zeros,
                                                             (self.axis_name,)), (d,), jnp.float32)
      y = y + bias
    return y.astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: float[B, T, N, H], H even.
    positions: int[B, T].
    base: RoPE wavelength base.
  Returns:
    float[B, T, N, H] in x's dtype.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  # Angles in float32, the rotation in x's dtype (as Llama's reference does): in bfloat16 the
  # projections' outputs are not widened to float32 around it.
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# (key, value) of one layer, float[B, K, S, H] each: a query's keys are contiguous per head,
# so decode-time attention reads them in place (no transposed copy of the cache per step).
KVCache = tuple[jax.Array, jax.Array]


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """softmax(q k^T / sqrt(H), masked) in float32: [B, K, N // K, T, S], query head k * (N // K) + g
  at [:, k, g]. Shapes as `attend`'s."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, t, kh, n // kh, h)
  s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(s, axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """softmax(q k^T / sqrt(H), masked) v, with grouped heads; scores and softmax in float32.

  Args:
    q: float[B, T, N, H]; k, v: float[B, S, K, H] with K dividing N.
    mask: bool[B, 1, T, S] (True: may attend) or None.
  Returns:
    float[B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  p = attention_probs(q, k, mask).astype(v.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h)


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunks: int) -> jax.Array:
  """`attend` for a causal mask (no query sees a later key) over T == S positions.

  Queries are cut into `chunks` blocks and block i only scores the keys up to its own
  end: the upper triangle is never computed, (chunks + 1) / (2 chunks) of the work of
  the full score matrix (5/8 for 4 chunks), with the same result.
  """
  t = q.shape[1]
  if chunks <= 1 or t % chunks:
    return attend(q, k, v, mask)
  c = t // chunks
  outs = [attend(q[:, i * c:(i + 1) * c], k[:, :(i + 1) * c], v[:, :(i + 1) * c],
                 mask[:, :, i * c:(i + 1) * c, :(i + 1) * c]) for i in range(chunks)]
  return jnp.concatenate(outs, axis=1)


def cache_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`attend` over a cache in its [B, K, S, H] layout, as batched matmuls over (B, K).

  Args:
    q: float[B, T, N, H]; k, v: float[B, K, S, H] with K dividing N.
    mask: bool[B, 1, T, S].
  Returns:
    float[B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  kh = k.shape[1]
  g = n // kh
  q = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, t, kh, g, h)
  q = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)  # [B, K, G*T, H]
  batch = ((0, 1), (0, 1))
  s = jax.lax.dot_general(q, k, (((3,), (3,)), batch), preferred_element_type=jnp.float32)  # [B, K, G*T, S]
  m = jnp.broadcast_to(mask[:, :, None], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
  s = jnp.where(m, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jax.lax.dot_general(p, v, (((3,), (2,)), batch))  # [B, K, G*T, H]
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# Applied with this collection mutable, every `Attention` also sows its softmax weights,
# float32[B, K, N // K, T, S] (`attention_probs`), under "probs", its keys as the queries
# meet them (after RoPE), float[B, T, K, H], under "keys", and its input x under "inputs"
# (in a scanned stack each with a leading layer axis); read by benchmarks/attention_lookup.py
# and benchmarks/token_probe.py. The output does not change.
PROBS_COLLECTION = "attention"


class Attention(nn.Module):
  """Multi-head / grouped-query attention with optional RoPE and a KV cache.

  With `cache=(k, v)` (float[B, K, S, H] each) and `cache_index=i`, the T new keys/values
  are written into slots [i, i + T) of the cache. With a mask over the S slots the queries
  attend over the whole cache (decoding); with a mask over the T new entries only, they
  attend over those (a prompt's prefill into an empty cache from slot 0, causal and chunked
  as in training). The caller's mask says which slots are valid for which query.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = False
  use_rope: bool = True
  rope_base: float = 10000.0
  causal_chunks: int = 1
  # "xla": the einsum path above. "splash": with `segment_ids` and no cache, the Pallas
  # splash kernel (mm1_jax.splash), causal within segments (+ `window`), in place of `mask`.
  impl: str = "xla"
  window: int | None = None  # the sliding window the mask carries, for the splash kernel
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array | None = None,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """x: float[B, T, D]; mask: bool[B, 1, T, S] or None (full attention); segment_ids:
    int[B, T], the segments `mask` was built from (splash reads these instead)."""
    d = x.shape[-1]
    dense = lambda feats, axes, name, n_in=1: Linear(  # noqa: E731
        feats, axes, num_in=n_in, use_bias=self.use_bias, dtype=self.dtype, name=name)
    q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), "query")(x)
    k = dense((self.num_kv_heads, self.head_dim), ("embed", "heads", "kv"), "key")(x)
    v = dense((self.num_kv_heads, self.head_dim), ("embed", "heads", "kv"), "value")(x)
    if self.use_rope:
      q = apply_rope(q, positions, self.rope_base)
      k = apply_rope(k, positions, self.rope_base)

    new_cache = None
    if cache is not None:
      zero = jnp.zeros((), jnp.int32)
      idx = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
      new_cache = tuple(jax.lax.dynamic_update_slice(c, a.transpose(0, 2, 1, 3).astype(c.dtype), idx)
                        for c, a in zip(cache, (k, v)))
      if mask is None or mask.shape[-1] != x.shape[1]:  # attend over the cache's slots
        ck, cv = (c.astype(q.dtype) for c in new_cache)
        out = cache_attend(q, ck, cv, mask if mask is not None else jnp.ones((1, 1, 1, ck.shape[2]), bool))
        return dense((d,), ("heads", "kv", "embed"), "out", n_in=2)(out), new_cache
      # A mask as wide as the new entries: they attend among themselves only, which is right
      # for the prefill of an empty cache and nothing else.
      if isinstance(cache_index, int) and cache_index != 0:
        raise ValueError(f"a mask over the {x.shape[1]} new entries only is for a prefill at cache slot 0, "
                         f"got slot {cache_index}; give a mask over the cache's slots")

    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if self.is_mutable_collection(PROBS_COLLECTION) and not self.is_initializing():  # diagnostics
      self.sow(PROBS_COLLECTION, "probs", attention_probs(q, k, mask))
      self.sow(PROBS_COLLECTION, "keys", k)
      self.sow(PROBS_COLLECTION, "inputs", x)
    # Initialisation needs no kernel (the parameters are the same) and may use any length.
    if self.impl == "splash" and segment_ids is not None and cache is None and not self.is_initializing():
      out = splash.attend(q, k, v, segment_ids, self.window)
    elif mask is not None and self.causal_chunks > 1:
      out = causal_attend(q, k, v, mask, self.causal_chunks)
    else:
      out = attend(q, k, v, mask)
    out = dense((d,), ("heads", "kv", "embed"), "out", n_in=2)(out)
    return out, new_cache


class MLP(nn.Module):
  """Feed-forward block: SwiGLU (`act='swiglu'`) or a plain two-layer MLP."""

  hidden: int
  act: str = "swiglu"
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    dense = lambda feats, axes, name: Linear(  # noqa: E731
        feats, axes, use_bias=self.use_bias, dtype=self.dtype, name=name)
    if self.act == "swiglu":
      h = nn.silu(dense((self.hidden,), ("embed", "mlp"), "gate")(x))
      h = h * dense((self.hidden,), ("embed", "mlp"), "up")(x)
    else:
      h = activation(self.act)(dense((self.hidden,), ("embed", "mlp"), "up")(x))
    return dense((d,), ("mlp", "embed"), "down")(h)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  acts = {
      "gelu": nn.gelu,
      "gelu_exact": lambda x: nn.gelu(x, approximate=False),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "silu": nn.silu,
      "relu": nn.relu,
  }
  if name not in acts:
    raise ValueError(f"unknown activation {name!r}; choose from {sorted(acts)}")
  return acts[name]


# Variable collections that a scanned stack stacks along its leading 'layers' axis:
# the parameters, per-layer statistics sown by sparse layers (mm1_jax.moe) and the
# attention weights sown for diagnostics (PROBS_COLLECTION).
STACKED_COLLECTIONS = ("params", "moe", PROBS_COLLECTION)

REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class BlockStack(nn.Module):
  """`depth` copies of a block, run as a layer stack.

  With scan=True the copies become one `nn.scan` whose parameters carry a leading
  'layers' axis (submodule "layers"): compile time no longer grows with depth.
  Otherwise they are unrolled as submodules "block_0", "block_1", ...

  The block is called as `block(carry, *shared, per_layer)` and returns
  `(carry, per_layer_out)`: `shared` arguments are the same for every layer, while
  `per_layer` (a KV cache, or None) holds one entry per block: stacked along a leading
  layer axis when scanned (the outputs stacked alike), a tuple of `depth` entries when
  unrolled (the outputs a tuple too: each block's buffers are updated in place, never
  sliced out of and stacked back into one array).
  """

  block_cls: type
  block_args: tuple
  depth: int
  scan: bool = True
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, carry, *args):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
    block_cls = self.block_cls
    if self.remat_policy != "none":
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
    *shared, per_layer = args
    if self.scan:
      scanned = nn.scan(block_cls, variable_axes={c: 0 for c in STACKED_COLLECTIONS},
                        split_rngs={"params": True},
                        in_axes=(nn.broadcast,) * len(shared) + (0,), length=self.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(*self.block_args, name="layers")(carry, *shared, per_layer)
    outs = []
    for i in range(self.depth):
      layer_in = None if per_layer is None else per_layer[i]
      carry, out = block_cls(*self.block_args, name=f"block_{i}")(carry, *shared, layer_in)
      outs.append(out)
    return carry, (None if per_layer is None else tuple(outs))
