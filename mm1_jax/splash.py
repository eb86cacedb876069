"""Causal attention within packed segments through the splash kernel (Pallas, TPU).

`DecoderConfig.attention_impl = "splash"` runs the decoder's training and scoring attention
through tokamax's splash attention: a flash-attention kernel for TPU written in Pallas
(Mosaic) that walks the score matrix in [block x block] tiles, keeps only a running max and
sum per query, and skips the tiles the causal mask leaves empty (segment ids are applied
inside each tile). No [B, N, T, S] float32 score matrix is ever written to HBM, which is
where the einsum path (`layers.attend`) spends its memory traffic at T = 4096; the backward pass recomputes the
tiles from the saved log-sum-exp, so remat policies save nothing of the scores either.

The kernel carries its own cost estimate (FLOPs and bytes of the forward and backward
calls), so `mm1-aot`'s compiler cost report counts it; a Pallas call without one counts as
zero work.

Where it runs:
- On TPU (the mesh's devices, or the default backend without a mesh) the Mosaic kernel is
  compiled. Elsewhere Pallas interprets the same kernel with jax ops: the same result, far
  slower; it is how CPU tests check the kernel's masking and gradients.
- With a mesh, the kernel runs inside one `jax.shard_map`: each device attends over its own
  rows (the "batch" rule's mesh axes) and heads (the "heads" rule's axes). A sharded
  "length" is not supported (no ring or context parallelism here) and fails with a message.
- Query and key lengths must be equal multiples of 128 (the TPU's lane width); the tile is
  the largest of 512, 256, 128 that divides T.

tokamax is an optional dependency (the `tpu` extra, pinned: the kernel is imported from its
`_src` tree, where MaxText takes it too).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mm1_jax import sharding

LANES = 128  # a tile's sides are multiples of the TPU lane width
TILES = (512, 256, 128)


def tile(length: int) -> int:
  """The largest tile of TILES dividing `length`; ValueError if none does."""
  for t in TILES:
    if length % t == 0:
      return t
  raise ValueError(f"splash attention needs a sequence length that is a multiple of {LANES}, got {length}: "
                   f"pad the sequences (SEQ_LEN) to a multiple of {LANES}, or use attention_impl='xla'")


def _kernel_lib():
  try:
    from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_mask as mask_lib
  except ImportError as e:
    raise ImportError("attention_impl='splash' needs tokamax: pip install -e '.[tpu]' "
                      f"(or pip install tokamax==0.0.12): {e}") from e
  return kernel_lib, mask_lib


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
           window: int | None = None) -> jax.Array:
  """Causal attention within segments: `layers.attend` under `model.segment_causal_mask`.

  Args:
    q: float[B, T, N, H]; k, v: float[B, T, K, H] with K dividing N.
    segment_ids: int[B, T]; a query sees the keys up to itself with its own id. Padding
      (id 0) attends among itself; no other id sees it, so real tokens are as under the
      dense mask (padding rows differ, and carry no loss).
    window: a query sees only the `window` most recent keys, itself included (Mistral).
  Returns:
    float[B, T, N, H] in q's dtype.
  """
  kernel_lib, mask_lib = _kernel_lib()
  b, t, n, h = q.shape
  kh = k.shape[2]
  if k.shape[1] != t:
    raise ValueError(f"splash attention here is self-attention over one length; got {t} queries, "
                     f"{k.shape[1]} keys")
  block = tile(t)
  mesh = jax.sharding.get_abstract_mesh()
  config = kernel_lib.SplashConfig(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      interpret=sharding.target_device().platform != "tpu")
  if window is None:
    mask = mask_lib.CausalMask((t, t))
  else:
    mask = mask_lib.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  scale = jnp.asarray(1.0 / math.sqrt(h), q.dtype)

  def local(q, k, v, seg):
    kernel = kernel_lib.make_splash_mha(mask, config=config, q_seq_shards=1)
    heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  [B, T, N, H] -> [B, N, T, H]
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(s, s))  # noqa: E731
    out = jax.vmap(one)(heads_first(q * scale), heads_first(k.astype(q.dtype)), heads_first(v.astype(q.dtype)), seg)
    return heads_first(out).astype(q.dtype)

  if mesh.empty or mesh.size == 1:
    return local(q, k, v, segment_ids)
  sizes = dict(mesh.shape)
  rows, length, heads, _ = sharding.split_axes(("batch", "length", "heads", "kv"), sizes)
  if length:
    raise ValueError(f"splash attention does not shard the sequence; the rules put 'length' on {length}")
  per = lambda axes: math.prod(sizes[a] for a in axes)  # noqa: E731
  if b % per(rows):
    raise ValueError(f"batch {b} does not divide over mesh axes {rows} ({per(rows)} devices)")
  if kh % per(heads) or n % per(heads):
    raise ValueError(f"{n} query / {kh} key-value heads do not divide over mesh axes {heads} ({per(heads)} "
                     "devices): splash attention needs whole heads on each device")
  act = P(rows or None, None, heads or None, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, P(rows or None, None)), out_specs=act,
                       check_vma=False)(q, k, v, segment_ids)
