"""Sparse mixture-of-experts FFN: top-k routing, two dispatch modes, auxiliary losses.

Routing (router math in float32): p = softmax(x W_r) over E experts; each token goes
to its top-k experts with weights p_i / sum_topk(p) (renormalised over the k).

Dispatch, chosen by `MoEConfig.dispatch`:
  "capacity"  each sequence is a group; expert e takes at most
              C = ceil(capacity_factor * T / E) of a group's assignments (AXLearn's
              convention, MM1's framework: top_k does not enter, so a factor of k is
              exactly the slots of a perfectly balanced load, and factor 2.0 with top-2
              leaves no headroom), first
              choices before second choices, earlier tokens first; the rest are
              dropped (their share of the output is zero) and the drop rate is logged.
              Dispatch and combine are one-hot einsums: static shapes, batch-parallel.
  "dropless"  every assignment is computed: assignments are sorted by expert and run
              as one grouped matmul (jax.lax.ragged_dot).

Auxiliary terms, sown into the "moe" collection per sparse layer (the train step
reads them with `mutable=["moe"]`; they are no-ops elsewhere):
  load_balance  E * sum_e f_e * P_e, f_e the fraction of assignments to e and P_e the
                mean router probability of e (1.0 when perfectly balanced)
  router_z      mean over tokens of logsumexp(router logits)^2
  drop_rate     fraction of assignments dropped (capacity dispatch; 0 for dropless)
All three count real tokens only: padding (the decoder's `valid` mask) takes no expert
capacity and stays out of the statistics.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp

from mm1_jax import layers
from mm1_jax import sharding

DISPATCH_MODES = ("capacity", "dropless")
AUX_COLLECTION = "moe"  # listed in layers.STACKED_COLLECTIONS


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Sparse FFN settings for a decoder (`decoder.DecoderConfig.moe`).

  Attributes:
    num_experts: E.
    top_k: experts per token (MM1: 2).
    every: the FFN of every `every`-th layer is sparse (layers every-1, 2*every-1, ...);
      1 makes every layer sparse (Mixtral).
    expert_mlp_dim: hidden width of one expert; None uses the dense mlp_dim.
    dispatch: "capacity" or "dropless".
    capacity_factor: slots per expert = capacity_factor x group tokens / E (AXLearn's
      convention; a perfectly balanced top-k load fills the slots at factor k).
    load_balance_weight: weight of the load-balance loss in the training loss.
    router_z_weight: weight of the router z-loss.
  """

  num_experts: int = 8
  top_k: int = 2
  every: int = 2
  expert_mlp_dim: int | None = None
  dispatch: str = "capacity"
  capacity_factor: float = 2.0
  load_balance_weight: float = 0.01
  router_z_weight: float = 0.001

  def __post_init__(self):
    if self.dispatch not in DISPATCH_MODES:
      raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
    if self.every < 1:
      raise ValueError(f"MoEConfig.every must be >= 1, got {self.every}")

  def capacity(self, group_size: int) -> int:
    return max(1, math.ceil(self.capacity_factor * group_size / self.num_experts))


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits: float32[..., E] -> (probs [..., E], weights [..., k], expert ids int32[..., k])."""
  probs = jax.nn.softmax(logits, axis=-1)
  top_p, top_i = jax.lax.top_k(probs, top_k)
  return probs, top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_i


def _masked_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over the leading (token) axis of x[N, ...], counting tokens with weight 1."""
  w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
  return jnp.sum(x * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)


def load_balance_loss(probs: jax.Array, expert_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """E * sum_e (fraction of the assignments to e) * (mean probability of e), over valid tokens."""
  e, k = probs.shape[-1], expert_ids.shape[-1]
  valid = jnp.ones(probs.shape[:-1], bool) if valid is None else valid
  assigned = jax.nn.one_hot(expert_ids, e, dtype=jnp.float32).reshape(-1, k, e).sum(1) / k  # [N, E]
  frac = _masked_mean(assigned, valid.reshape(-1))
  mean_p = _masked_mean(probs.reshape(-1, e), valid.reshape(-1))
  return e * jnp.sum(frac * mean_p)


class MoEMLP(nn.Module):
  """x: float[B, T, D] -> float[B, T, D]; SwiGLU experts with weights [E, D, F] / [E, F, D]."""

  config: MoEConfig
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """valid: bool[B, T], False on padding: padding takes no expert capacity and is left
    out of the auxiliary losses and the drop rate (its output is not used)."""
    c = self.config
    b, t, d = x.shape
    valid = jnp.ones((b, t), bool) if valid is None else valid
    e, f = c.num_experts, c.expert_mlp_dim or self.mlp_dim
    router = self.param("router", sharding.partitioned(layers.default_init, ("embed", None)),
                        (d, e), jnp.float32)
    init = sharding.partitioned(nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                          in_axis=-2, out_axis=-1),
                                        ("expert", "embed", "mlp"))
    w_gate = self.param("gate", init, (e, d, f), jnp.float32)
    w_up = self.param("up", init, (e, d, f), jnp.float32)
    w_down = self.param("down", sharding.partitioned(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1),
        ("expert", "mlp", "embed")), (e, f, d), jnp.float32)
    w_gate, w_up, w_down = (jnp.asarray(w, self.dtype) for w in (w_gate, w_up, w_down))

    logits = jnp.dot(x.astype(jnp.float32).reshape(-1, d), router).reshape(b, t, e)
    probs, weights, expert_ids = route(logits, c.top_k)  # [B, T, E], [B, T, k], [B, T, k]
    self.sow(AUX_COLLECTION, "load_balance", load_balance_loss(probs, expert_ids, valid))
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    self.sow(AUX_COLLECTION, "router_z", _masked_mean(z.reshape(-1), valid.reshape(-1)))

    if c.dispatch == "dropless":
      y = _dropless(x.astype(self.dtype), weights, expert_ids, w_gate, w_up, w_down)
      drop_rate = jnp.zeros((), jnp.float32)
    else:
      y, drop_rate = _capacity(x.astype(self.dtype), weights, expert_ids, valid, w_gate, w_up, w_down,
                               c.capacity(t))
    self.sow(AUX_COLLECTION, "drop_rate", drop_rate)
    return y.astype(self.dtype)


def _swiglu(h_in, w_gate, w_up, w_down, matmul):
  return matmul(nn.silu(matmul(h_in, w_gate)) * matmul(h_in, w_up), w_down)


def _dropless(x, weights, expert_ids, w_gate, w_up, w_down):
  b, t, d = x.shape
  k, e = expert_ids.shape[-1], w_gate.shape[0]
  flat_ids = expert_ids.reshape(-1)  # [N * k], assignment a belongs to token a // k
  order = jnp.argsort(flat_ids, stable=True)
  tokens = jnp.take(x.reshape(-1, d), order // k, axis=0)  # [N * k, D], grouped by expert
  group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)
  matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
  out_sorted = _swiglu(tokens, w_gate, w_up, w_down, matmul)
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(b, t, k, d)
  return jnp.einsum("btkd,btk->btd", out, weights.astype(out.dtype))


def _capacity(x, weights, expert_ids, valid, w_gate, w_up, w_down, capacity):
  b, t, _ = x.shape
  k, e = expert_ids.shape[-1], w_gate.shape[0]
  # Slot of each assignment in its expert's buffer: count earlier assignments to the same
  # expert in priority order (all first choices of the sequence, then all second choices).
  # Padding tokens are assigned nowhere, so they take no slot.
  onehot = jax.nn.one_hot(jnp.swapaxes(expert_ids, 1, 2), e, dtype=jnp.int32)  # [B, k, T, E]
  onehot = onehot * valid[:, None, :, None].astype(jnp.int32)
  flat = onehot.reshape(b, k * t, e)
  slot = ((jnp.cumsum(flat, axis=1) - 1) * flat).sum(-1).reshape(b, k, t)  # [B, k, T]
  kept = slot < capacity
  slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=x.dtype)  # [B,k,T,C]
  # dispatch[b, t, e, c] = 1 when token t's assignment to e sits in slot c.
  dispatch = jnp.einsum("bkte,bktc->btec", onehot.astype(x.dtype), slot_onehot)
  w = (jnp.swapaxes(weights, 1, 2) * kept).astype(x.dtype)  # [B, k, T]
  combine = jnp.einsum("bkte,bktc,bkt->btec", onehot.astype(x.dtype), slot_onehot, w)
  expert_in = jnp.einsum("btec,btd->ebcd", dispatch, x)
  expert_in = sharding.constrain(expert_in, ("expert", "batch", None, "embed"))
  matmul = lambda a, wt: jnp.einsum("ebcx,exy->ebcy", a, wt)
  expert_out = _swiglu(expert_in, w_gate, w_up, w_down, matmul)
  y = jnp.einsum("btec,ebcd->btd", combine, expert_out)
  real = jnp.broadcast_to(valid[:, None, :], kept.shape)
  drop_rate = jnp.sum(~kept & real) / jnp.maximum(jnp.sum(real), 1)
  return y, drop_rate


def summarize_aux(collection) -> dict[str, jax.Array]:
  """Mean of each sown statistic over all sparse layers: {'load_balance', 'router_z', 'drop_rate'}.

  `collection` is the "moe" variable collection returned by `apply(..., mutable=["moe"])`;
  an empty one (a dense model) gives {}.
  """
  values: dict[str, list[jax.Array]] = {}
  for path, leaf in traverse_util.flatten_dict(dict(collection)).items():
    for v in (leaf if isinstance(leaf, tuple) else (leaf,)):
      values.setdefault(path[-1], []).append(jnp.ravel(v))
  return {k: jnp.mean(jnp.concatenate(v)) for k, v in values.items()}
