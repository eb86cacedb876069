"""Decoder-only transformer LLM: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.

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
  remat: bool = False  # rematerialise each block in the backward pass
  dtype: str = "float32"


class DecoderBlock(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x, mask, positions, cache=None, cache_index=0):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h = layers.RMSNorm(c.norm_eps, dtype=dtype, name="ln_attn")(x)
    h, cache = layers.Attention(c.num_heads, c.num_kv_heads, c.head_dim, rope_base=c.rope_base,
                                dtype=dtype, name="attn")(h, mask, positions, cache, cache_index)
    x = x + h
    h = layers.RMSNorm(c.norm_eps, dtype=dtype, name="ln_mlp")(x)
    x = x + layers.MLP(c.mlp_dim, act="swiglu", dtype=dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class Decoder(nn.Module):
  config: DecoderConfig

  def setup(self):
    c = self.config
    self.embedding = nn.Embed(
        c.vocab_size, c.width, dtype=jnp.dtype(c.dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        name="embedding")
    block = nn.remat(DecoderBlock) if c.remat else DecoderBlock
    self.blocks = [block(c, name=f"block_{i}") for i in range(c.depth)]
    self.ln_final = layers.RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), name="ln_final")
    if not c.tie_embeddings:
      self.lm_head = layers.Linear((c.vocab_size,), ("embed", "vocab"), dtype=jnp.dtype(c.dtype),
                                   name="lm_head")

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int[B, T] -> float[B, T, D]."""
    return self.embedding(tokens)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array,
               cache: list[layers.KVCache] | None = None, cache_index: jax.Array | int = 0
               ) -> tuple[jax.Array, list[layers.KVCache] | None]:
    """Runs the stack.

    Args:
      x: float[B, T, D] input embeddings.
      mask: bool[B, 1, T, S] attention mask (S = T without a cache, cache length with one).
      positions: int[B, T] RoPE positions.
      cache: per-layer (key, value) caches, float[B, S, K, H] each, or None.
      cache_index: slot at which the T new entries are written.
    Returns:
      (logits float32[B, T, V], updated caches or None)
    """
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, mask, positions, None if cache is None else cache[i], cache_index)
      if cache is not None:
        new_cache.append(layer_cache)
    x = self.ln_final(x)
    if self.config.tie_embeddings:
      # Tied head in float32 whatever the compute dtype: logits feed a softmax over V.
      table = jnp.asarray(self.embedding.embedding, jnp.float32)  # [V, D]
      logits = jnp.dot(x.astype(jnp.float32), table.T) / jnp.sqrt(self.config.width)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), new_cache

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> list[layers.KVCache]:
    c = self.config
    shape = (batch, length, c.num_kv_heads, c.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.depth)]
