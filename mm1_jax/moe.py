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
  "dropless"  every assignment of a real token is computed: assignments are sorted by
              expert and run as one grouped matmul (jax.lax.ragged_dot). Padding
              tokens get the sentinel expert E: they are in no group, so no matmul row
              is theirs (ragged_dot leaves rows past the last group out; their output
              is zero), and nothing of theirs is exchanged.

Expert parallelism. With an ambient mesh (`jax.set_mesh`, as train.py and aot.py do) the
layer runs inside one `jax.shard_map` over all mesh axes, laid out by the logical-axis
rules (`_plan`): tokens split over the "batch" rule's axes (data, fsdp, expert), experts
over the "expert" axes (device s of M holds the E_l = E / M experts [s E_l, (s+1) E_l)),
each expert's hidden width over the "mlp" axes (tensor; the down projection is psum-ed
over them), the embed dimension gathered (FSDP) on the way in. The router and the
auxiliary statistics stay outside, on the batch-sharded arrays, as without a mesh.
  dropless  each device sorts its own assignments by expert and scatters their token rows
            into a send buffer [M, S, D], block j for device j's experts; one
            jax.lax.all_to_all over the expert axis delivers block j to device j (with
            the local expert id of every row, E_l in empty slots); that device runs its
            E_l experts as one ragged_dot over the M * S received rows grouped by local
            expert, and a second all_to_all returns the results to the same slots,
            where the sender combines them with the routing weights. XLA:CPU does not
            implement jax.lax.ragged_all_to_all, so the exchange is a fixed-size
            all_to_all whose per-destination block is the worst case,
            S = n * min(k, E_l) rows for a device's n tokens (a token's k experts are
            distinct, so at most min(k, E_l) of them live on one device): nothing is ever
            dropped, at the price of exchanging and holding M * S rows per device for
            at most n * k real ones (M * min(k, E_l) / k times as many; the empty slots
            are in no group of the ragged_dot). A ragged all-to-all (TPU, GPU) would
            exchange only the real rows; it is not used here.
  capacity  each device builds its rows' capacity buffers [E, b, C, D] with the one-hot
            einsums, an all_to_all over the expert axis (split experts, concatenate
            rows) gives it [E_l, M b, C, D], its experts run as einsums, and the reverse
            all_to_all brings [E, b, C, D] back for the combine einsum. Explicit rather
            than the GSPMD einsum with a sharding constraint (the path without a mesh):
            the exchange is then an all_to_all by construction, not whatever the
            partitioner picks. The buffers are the capacity slots: nothing to bound.
  With expert axis 1 (or E not divisible by it) the same shard_map runs with no exchange
  (each device runs every expert on its own tokens, with no global sort). A batch whose tokens (dropless) or rows
  (capacity) do not divide the token shards is padded with padding tokens / rows. Without
  a mesh (or a one-device one) the layer is plain jax ops, as before. Every path computes
  the same per-row products, so results agree with the one-device ones up to float
  rounding (tests/test_moe_expert_parallel.py).

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
import functools
import math
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mm1_jax import gmm
from mm1_jax import layers
from mm1_jax import sharding

DISPATCH_MODES = ("capacity", "dropless")
GROUPED_MATMULS = ("xla", "pallas")
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
    grouped_matmul: how dropless runs its grouped matmuls: "xla" (jax.lax.ragged_dot, left to
      the compiler) or "pallas" (the megablox kernels, mm1_jax/gmm.py; TPU, interpreted
      elsewhere; width and expert width multiples of 128 on each device).
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
  grouped_matmul: str = "xla"
  capacity_factor: float = 2.0
  load_balance_weight: float = 0.01
  router_z_weight: float = 0.001

  def __post_init__(self):
    if self.dispatch not in DISPATCH_MODES:
      raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
    if self.grouped_matmul not in GROUPED_MATMULS:
      raise ValueError(f"MoEConfig.grouped_matmul must be one of {GROUPED_MATMULS}, got {self.grouped_matmul!r}")
    if self.grouped_matmul != "xla" and self.dispatch != "dropless":
      raise ValueError(f"MoEConfig.grouped_matmul={self.grouped_matmul!r} is for dispatch='dropless' (capacity "
                       "dispatch runs its experts as batched einsums)")
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

    plan = _plan(e, f)
    if c.dispatch == "dropless":
      y = _dropless(x.astype(self.dtype), weights, expert_ids, valid, w_gate, w_up, w_down, plan,
                    c.grouped_matmul)
      drop_rate = jnp.zeros((), jnp.float32)
    else:
      y, drop_rate = _capacity(x.astype(self.dtype), weights, expert_ids, valid, w_gate, w_up, w_down,
                               c.capacity(t), plan)
    self.sow(AUX_COLLECTION, "drop_rate", drop_rate)
    return y.astype(self.dtype)


def _swiglu(h_in, w_gate, w_up, w_down, matmul):
  return matmul(nn.silu(matmul(h_in, w_gate)) * matmul(h_in, w_up), w_down)


def _grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "xla") -> jax.Array:
  """lhs[R, X] rows grouped by expert (group g = the next group_sizes[g] rows), rhs[G, X, Y]:
  rows after the last group belong to no expert and come out as zeros. (A module-level
  name so that tests can observe the group sizes.)"""
  if impl == "pallas":
    return gmm.grouped_matmul(lhs, rhs, group_sizes)
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


# --- where the experts live ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How MoEMLP runs on the ambient mesh: inside one shard_map over all its axes.

  token_axes: mesh axes the tokens (capacity: the rows) are split over, the "batch" rule's
    axes plus the expert axes; expert_axes: the axes the experts are split over (the
    all-to-all axes, () for none); mlp_axes: the axes each expert's hidden width is split
    over (the down projection's partial sums are psum-ed over them).
  """

  mesh: Any
  token_axes: tuple[str, ...]
  expert_axes: tuple[str, ...]
  mlp_axes: tuple[str, ...]

  def size(self, axes: tuple[str, ...]) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  def specs(self):
    """PartitionSpecs of (token-major arrays, w_gate / w_up [E, D, F], w_down [E, F, D])."""
    tok, exp, mlp = (a or None for a in (self.token_axes, self.expert_axes, self.mlp_axes))
    return P(tok), P(exp, None, mlp), P(exp, mlp, None)


def _plan(num_experts: int, expert_mlp_dim: int) -> _Plan | None:
  """The layout for the ambient mesh (`jax.set_mesh`) and logical-axis rules; None without a
  mesh (or a one-device one, or rules that split nothing), where the layer runs as plain
  jax ops."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  sizes = dict(mesh.shape)
  expert, _, mlp = sharding.split_axes(("expert", "embed", "mlp"), sizes)
  if num_experts % math.prod(sizes[a] for a in expert):
    expert = ()  # experts that do not divide stay whole on every device
  (tokens,) = sharding.split_axes(("batch",), sizes)
  tokens += tuple(a for a in expert if a not in tokens)
  mlp = tuple(a for a in mlp if a not in tokens)
  if expert_mlp_dim % math.prod(sizes[a] for a in mlp):
    mlp = ()
  if not tokens and not mlp:
    return None
  return _Plan(mesh, tokens, expert, mlp)


def _pad_rows(arrays, multiple: int):
  """Pads the leading axis of each array with zeros (False for `valid`: padding) to a multiple."""
  pad = -arrays[0].shape[0] % multiple
  if not pad:
    return arrays
  return tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays)


# --- dropless ----------------------------------------------------------------------------


def _dropless(x, weights, expert_ids, valid, w_gate, w_up, w_down, plan: _Plan | None = None,
              impl: str = "xla"):
  b, t, d = x.shape
  k = expert_ids.shape[-1]
  args = (x.reshape(b * t, d), weights.reshape(b * t, k), expert_ids.reshape(b * t, k), valid.reshape(b * t))
  if plan is None:
    y = _dropless_local(*args, w_gate, w_up, w_down, expert_axes=(), num_shards=1, mlp_axes=(), impl=impl)
    return y.reshape(b, t, d)
  args = _pad_rows(args, plan.size(plan.token_axes))  # padded tokens are invalid: no work
  tok, wio, wout = plan.specs()
  body = functools.partial(_dropless_local, expert_axes=plan.expert_axes,
                           num_shards=plan.size(plan.expert_axes), mlp_axes=plan.mlp_axes, impl=impl)
  # Pallas calls declare no varying mesh axes for their outputs: unchecked there.
  y = jax.shard_map(body, mesh=plan.mesh, in_specs=(tok, tok, tok, tok, wio, wio, wout),
                    out_specs=tok, check_vma=impl != "pallas")(*args, w_gate, w_up, w_down)
  return y[:b * t].reshape(b, t, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_rows(x, index, inverse, copies):
  """x[index // copies]: with copies = 1 the permutation `index` of x's rows (`inverse` its
  inverse), with copies = k a permutation of x's rows each repeated k times. The gradient is
  a gather too (the inverse permutation, then the k copies summed), not the scatter-add
  jax.numpy's gather transposes to: a permutation's transpose is its inverse."""
  return jnp.take(x, index // copies, axis=0)


def _gather_rows_fwd(x, index, inverse, copies):
  return _gather_rows(x, index, inverse, copies), inverse


def _gather_rows_bwd(copies, inverse, grad):
  back = jnp.take(grad, inverse, axis=0)
  if copies > 1:
    back = back.reshape(-1, copies, grad.shape[-1]).sum(axis=1)
  return back, None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _local_experts(rows, group_ids, num_groups, w_gate, w_up, w_down, mlp_axes, impl="xla", copies=1):
  """SwiGLU of each row of rows[R, D] by expert group_ids[R * copies] (each row is `copies`
  consecutive assignments; num_groups: no expert, not computed) as one grouped matmul; the
  result in the assignments' order, zeros for ungrouped ones. Rows reach the expert order and
  come back by gathers (`_gather_rows`), in the backward pass as well."""
  order = jnp.argsort(group_ids, stable=True)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  sizes = jnp.bincount(group_ids, length=num_groups + 1)[:num_groups].astype(jnp.int32)
  matmul = lambda a, w: _grouped_matmul(a, w, sizes, impl)
  out = _swiglu(_gather_rows(rows, order, inverse, copies), w_gate, w_up, w_down, matmul)
  if mlp_axes:  # each device holds a slice of every expert's hidden width
    out = jax.lax.psum(out, mlp_axes)
  return _gather_rows(out, inverse, order, 1)


def _dropless_local(x, weights, expert_ids, valid, w_gate, w_up, w_down, *, expert_axes, num_shards,
                    mlp_axes, impl="xla"):
  """One device's tokens x[n, D] (all of them without a mesh); it holds experts
  [s * E_l, (s + 1) * E_l) of E = num_shards * E_l, s its index along expert_axes.

  Assignment a = token a // k's (a % k)-th choice. Padding tokens' assignments get the
  sentinel expert E: no group, no row of any matmul, nothing sent; their output is 0.
  With num_shards > 1 each device scatters its assignments' token rows into a send buffer
  [num_shards, S, D] (block j: the rows for device j's experts, in expert order), where
  S = n * min(k, E_l) is the worst case (a token's k experts are distinct, so at most
  min(k, E_l) of them sit on one device); an all-to-all delivers block j to device j,
  which runs its E_l experts on what it received (empty slots carry the sentinel E_l),
  and the reverse all-to-all brings the results back to the same slots.
  """
  n, d = x.shape
  k, e_local = expert_ids.shape[-1], w_gate.shape[0]
  num_experts = e_local * num_shards
  assigned = jnp.repeat(valid, k)  # [n * k]
  key = jnp.where(assigned, expert_ids.reshape(-1), num_experts)
  if num_shards == 1:
    out = _local_experts(x, key, num_experts, w_gate, w_up, w_down, mlp_axes, impl, copies=k)
  else:
    slots = n * min(k, e_local)
    dest = key // e_local  # num_shards for padding: out of range, dropped below
    counts = jnp.bincount(dest, length=num_shards + 1)[:num_shards]
    first = jnp.cumsum(counts) - counts  # where each destination's block starts in sorted order
    rank = jnp.zeros_like(key).at[jnp.argsort(key, stable=True)].set(jnp.arange(key.shape[0]))
    slot = jnp.where(assigned, rank - first[jnp.minimum(dest, num_shards - 1)], slots)
    send = jnp.zeros((num_shards, slots, d), x.dtype).at[dest, slot].set(jnp.repeat(x, k, axis=0),
                                                                             mode="drop")
    send_ids = jnp.full((num_shards, slots), e_local, key.dtype).at[dest, slot].set(key % e_local,
                                                                                   mode="drop")
    recv = jax.lax.all_to_all(send, expert_axes, 0, 0)  # recv[i]: the rows device i sent here
    recv_ids = jax.lax.all_to_all(send_ids, expert_axes, 0, 0)
    done = _local_experts(recv.reshape(-1, d), recv_ids.reshape(-1), e_local, w_gate, w_up, w_down,
                          mlp_axes, impl)
    back = jax.lax.all_to_all(done.reshape(num_shards, slots, d), expert_axes, 0, 0)
    out = back.at[dest, slot].get(mode="fill", fill_value=0)
  out = out.reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


# --- capacity ----------------------------------------------------------------------------


def _capacity(x, weights, expert_ids, valid, w_gate, w_up, w_down, capacity, plan: _Plan | None = None):
  b = x.shape[0]
  if plan is None:
    y, kept = _capacity_local(x, weights, expert_ids, valid, w_gate, w_up, w_down, capacity=capacity,
                              expert_axes=(), num_shards=1, mlp_axes=(), gspmd=True)
  else:
    # Groups are rows: a row never splits across devices (padded rows are all padding).
    args = _pad_rows((x, weights, expert_ids, valid), plan.size(plan.token_axes))
    tok, wio, wout = plan.specs()
    body = functools.partial(_capacity_local, capacity=capacity, expert_axes=plan.expert_axes,
                             num_shards=plan.size(plan.expert_axes), mlp_axes=plan.mlp_axes,
                             gspmd=False)
    y, kept = jax.shard_map(body, mesh=plan.mesh, in_specs=(tok, tok, tok, tok, wio, wio, wout),
                            out_specs=(tok, tok))(*args, w_gate, w_up, w_down)
    y, kept = y[:b], kept[:b]
  real = jnp.broadcast_to(valid[:, None, :], kept.shape)
  drop_rate = jnp.sum(~kept & real) / jnp.maximum(jnp.sum(real), 1)
  return y, drop_rate


def _capacity_local(x, weights, expert_ids, valid, w_gate, w_up, w_down, *, capacity, expert_axes,
                    num_shards, mlp_axes, gspmd):
  """Rows x[b, T, D] (one device's, or all); returns (y [b, T, D], kept bool[b, k, T]).

  With num_shards > 1 the capacity buffers [E, b, C, D] go through an all-to-all over
  expert_axes (block j of the experts to device j, which receives [E_l, num_shards * b, C, D]:
  its experts' slots of every device's rows), and back the same way.
  """
  b, t, _ = x.shape
  k, e = expert_ids.shape[-1], w_gate.shape[0] * num_shards
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
  if gspmd:
    expert_in = sharding.constrain(expert_in, ("expert", "batch", None, "embed"))
  if num_shards > 1:
    expert_in = jax.lax.all_to_all(expert_in, expert_axes, 0, 1, tiled=True)  # [E_l, S * b, C, D]
  matmul = lambda a, wt: jnp.einsum("ebcx,exy->ebcy", a, wt)
  expert_out = _swiglu(expert_in, w_gate, w_up, w_down, matmul)
  if mlp_axes:
    expert_out = jax.lax.psum(expert_out, mlp_axes)
  if num_shards > 1:
    expert_out = jax.lax.all_to_all(expert_out, expert_axes, 1, 0, tiled=True)  # [E, b, C, D]
  y = jnp.einsum("btec,ebcd->btd", combine, expert_out)
  return y, kept


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
