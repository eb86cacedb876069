"""Decoder-only transformer LLM: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.

Dense (Llama / Mistral layout) or sparse: with `DecoderConfig.moe` set, the FFN of every
`moe.every`-th layer is a mixture of experts (`mm1_jax.moe`). A sparse stack is scanned
in groups of `every` layers (every-1 dense blocks, then a sparse one), so the scan body
stays homogeneous and compile time does not grow with depth.

The decoder consumes embeddings rather than token ids so that image tokens can be
spliced in by the caller (`mm1_jax.model`). With a KV cache it serves both
prefill (T prompt tokens) and one-token decode steps from the same code.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax import layers
from mm1_jax import sharding
from mm1_jax import moe as moe_lib


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 512
  width: int = 256
  depth: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 768
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  # Tied head only: divide logits by sqrt(width) (embeddings initialised at unit scale).
  # Imported Llama-family weights are unscaled: mm1-convert sets False.
  scale_tied_logits: bool = True
  sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys
  moe: moe_lib.MoEConfig | None = None  # sparse FFNs; None is a dense decoder
  scan_layers: bool = True  # one nn.scan over the blocks; params get a leading 'layers' axis
  remat_policy: str = "none"  # see layers.REMAT_POLICIES
  # Training/scoring attention in this many causal query blocks, each scoring only the
  # keys up to its end (layers.causal_attend); 1 scores the full T x T matrix.
  attention_chunks: int = 4
  # "xla": einsum attention (above). "splash": the training and scoring passes (given
  # segment ids, no cache) run the Pallas splash kernel (mm1_jax.splash; tokamax, the
  # `tpu` extra): no score matrix in HBM. Prefill and decoding keep the einsum path.
  attention_impl: str = "xla"
  dtype: str = "float32"


  def __post_init__(self):
    if self.moe is not None and self.depth % self.moe.every:
      raise ValueError(f"depth {self.depth} is not a multiple of moe.every {self.moe.every}")
    if self.attention_impl not in ("xla", "splash"):
      raise ValueError(f"attention_impl {self.attention_impl!r}: choose 'xla' or 'splash'")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

  @property
  def group_size(self) -> int:
    """Layers per scanned unit: 1 for dense or all-sparse stacks, moe.every otherwise."""
    return 1 if self.moe is None else self.moe.every


class DecoderBlock(nn.Module):
  config: DecoderConfig
  sparse: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, cache_index, valid, segment_ids, cache):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h = layers.RMSNorm(c.norm_eps, dtype=dtype, name="ln_attn")(x)
    h, cache = layers.Attention(c.num_heads, c.num_kv_heads, c.head_dim, rope_base=c.rope_base,
                                causal_chunks=c.attention_chunks, impl=c.attention_impl, window=c.sliding_window,
                                dtype=dtype, name="attn")(h, mask, positions, cache, cache_index, segment_ids)
    x = x + h
    h = layers.RMSNorm(c.norm_eps, dtype=dtype, name="ln_mlp")(x)
    if self.sparse:
      x = x + moe_lib.MoEMLP(c.moe, c.mlp_dim, dtype=dtype, name="moe")(h, valid)
    else:
      x = x + layers.MLP(c.mlp_dim, act="swiglu", dtype=dtype, name="mlp")(h)
    return sharding.constrain(x, ("batch", "length", "embed")), cache


class DecoderGroup(nn.Module):
  """moe.every consecutive layers: dense blocks "dense_0".. then the sparse block "sparse"."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, mask, positions, cache_index, valid, segment_ids, cache):
    g = self.config.group_size
    stacked = self.config.scan_layers  # the group's caches: stacked [g, ...], else a tuple of g
    new = []
    for i in range(g):
      sparse = i == g - 1
      layer_cache = None
      if cache is not None:
        layer_cache = jax.tree.map(lambda a: a[i], cache) if stacked else cache[i]  # noqa: B023
      x, out = DecoderBlock(self.config, sparse, name="sparse" if sparse else f"dense_{i}")(
          x, mask, positions, cache_index, valid, segment_ids, layer_cache)
      new.append(out)
    if cache is None:
      return x, None
    return x, (jax.tree.map(lambda *a: jnp.stack(a), *new) if stacked else tuple(new))


class Decoder(nn.Module):
  config: DecoderConfig

  def setup(self):
    c = self.config
    self.embedding = nn.Embed(
        c.vocab_size, c.width, dtype=jnp.dtype(c.dtype),
        embedding_init=sharding.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
        name="embedding")
    if c.group_size > 1:
      block_cls, args = DecoderGroup, (c,)
    else:
      block_cls, args = DecoderBlock, (c, c.moe is not None)
    self.blocks = layers.BlockStack(block_cls, args, c.depth // c.group_size, c.scan_layers,
                                    c.remat_policy, name="blocks")
    self.ln_final = layers.RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), name="ln_final")
    if not c.tie_embeddings:
      self.lm_head = layers.Linear((c.vocab_size,), ("embed", "vocab"), dtype=jnp.dtype(c.dtype),
                                   name="lm_head")

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int[B, T] -> float[B, T, D]."""
    return self.embedding(tokens)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array,
               cache: layers.KVCache | None = None, cache_index: jax.Array | int = 0,
               valid: jax.Array | None = None, last_only: bool = False, return_hidden: bool = False,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, layers.KVCache | None]:
    """Runs the stack.

    Args:
      x: float[B, T, D] input embeddings.
      mask: bool[B, 1, T, S] attention mask (S = T without a cache; with one, the cache
        length, or T for a prefill from slot 0 that attends over the new entries only).
      positions: int[B, T] RoPE positions.
      cache: the layers' key/value caches (`init_cache`), or None.
      cache_index: slot at which the T new entries are written.
      valid: bool[B, T], False on padding (sparse layers leave padding out); None: all valid.
      segment_ids: int[B, T], the segments `mask` was built from (`model.segment_causal_mask`);
        attention_impl="splash" reads these instead of the mask. None: the mask is used.
      last_only: logits of the last position only (a prompt's prefill needs no others).
      return_hidden: return the final-norm hidden states float[B, T, D] instead of logits
        (`logits` turns them into logits; AIMv2 also reads them at image positions).
    Returns:
      (logits float32[B, T, V] (T = 1 with last_only), updated caches or None)
    """
    x = sharding.constrain(x, ("batch", "length", "embed"))
    g = self.config.group_size
    scan = self.config.scan_layers
    if cache is not None and g > 1:  # one entry per group of g layers
      if scan:  # [L, ...] -> [L / g, g, ...]
        cache = jax.tree.map(lambda a: a.reshape((a.shape[0] // g, g) + a.shape[1:]), cache)
      else:
        cache = tuple(tuple(cache[i:i + g]) for i in range(0, len(cache), g))
    valid = jnp.ones(x.shape[:2], bool) if valid is None else valid
    x, new_cache = self.blocks(x, mask, positions, jnp.asarray(cache_index, jnp.int32), valid, segment_ids, cache)
    if new_cache is not None and g > 1:
      if scan:
        new_cache = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), new_cache)
      else:
        new_cache = tuple(layer for group in new_cache for layer in group)
    x = self.ln_final(x)
    self.sow("intermediates", "hidden_states", x)  # read by mm1-convert verify
    if last_only:
      x = x[:, -1:]
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache

  def logits(self, x: jax.Array) -> jax.Array:
    """Final-norm hidden states float[B, T, D] -> logits float32[B, T, V]."""
    if self.config.tie_embeddings:
      # Tied head in float32 whatever the compute dtype: logits feed a softmax over V.
      table = jnp.asarray(self.embedding.embedding, jnp.float32)  # [V, D]
      logits = jnp.dot(x.astype(jnp.float32), table.T)
      if self.config.scale_tied_logits:
        logits = logits / jnp.sqrt(self.config.width)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "vocab"))


def init_cache(config: DecoderConfig, batch: int, length: int):
  """Empty key/value caches for all layers, float[B, K, length, H] per layer and per key/value.

  Scanned stacks: one (key, value) pair stacked over layers, float[L, B, K, length, H] each.
  Unrolled stacks: a tuple of L (key, value) pairs, one buffer each, so that a decoding step
  updates every layer's buffers in place rather than slicing them out of one array and
  stacking them back (a copy of the whole cache per token).
  """
  shape = (batch, config.num_kv_heads, length, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  if config.scan_layers:
    return jnp.zeros((config.depth,) + shape, dtype), jnp.zeros((config.depth,) + shape, dtype)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.depth))


def cache_length(cache) -> int:
  """Slots S of a cache made by `init_cache`."""
  return jax.tree.leaves(cache)[0].shape[-2]
