"""Grouped matmul of the dropless MoE through the megablox kernels (Pallas, TPU).

`MoEConfig.grouped_matmul = "pallas"` runs the experts' three projections through tokamax's
Pallas (Mosaic TPU) grouped-matmul kernels, the megablox design: rows sorted by expert are
walked in [tile_m x tile_k] blocks, each block multiplied only with its own expert's weight
block, so the work is that of the rows actually routed. The backward pass is two more kernel
calls: the input gradient is the same grouped matmul against the transposed weights, the
weight gradient a transposed grouped matmul (`tgmm`: per expert, its rows' inputs against
their output gradients).

Both kernels carry a cost estimate (FLOPs and the bytes their tiling reads), so `mm1-aot`'s
compiler cost report counts them. The default path ("xla", `jax.lax.ragged_dot`) leaves the
grouped matmul to the TPU compiler instead; which is faster is a measurement
(benchmarks/tpu_levers.py, study `mm1_mixtral_8x7b_text_v5p-128`).

Off TPU, Pallas interprets the same kernels with jax ops (same results, far slower): CPU
tests compare them with `jax.lax.ragged_dot`. The contraction and output widths must be multiples of
128 (the TPU lane width); rows are padded to a multiple of the row tile (512, or 128 for
fewer rows), and the padded rows, like rows past the last group, come out as zeros.

tokamax is an optional dependency (the `tpu` extra, pinned: the kernels are imported from its
`_src` tree, as for the splash attention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic import tpu_info

from mm1_jax import sharding

LANES = 128
# Tile sizes: rows 512 (rows are padded to a multiple; 128 when there are fewer), contraction
# and output columns the largest of COL_TILES dividing them. 512 x 1024 x 1024 is MaxText's
# megablox default for the experts' projections.
ROW_TILE = 512
COL_TILES = (1024, 512, 256, 128)


def _kernels():
  try:
    from tokamax._src.ops.ragged_dot import pallas_mosaic_tpu_kernel as kernels
  except ImportError as e:
    raise ImportError("grouped_matmul='pallas' needs tokamax: pip install -e '.[tpu]' "
                      f"(or pip install tokamax==0.0.12): {e}") from e
  return kernels


def _tile(size: int, tiles: tuple[int, ...]) -> int:
  for t in tiles:
    if size % t == 0:
      return t
  raise ValueError(f"grouped_matmul='pallas' needs widths that are multiples of {LANES}, got {size}")


def _interpret() -> bool:
  """Whether the kernels run interpreted: off TPU. The kernels' pipelines lay out their blocks
  for a TPU generation even when interpreted, so the device they run on is registered with
  Pallas as one TensorCore of a v5p (for this process; the interpreted results do not depend
  on it). Tracing alone interprets too: parameter counting (`jax.eval_shape` of the model on
  the host, as the LR law's does) goes through here before a TPU compile."""
  device = sharding.target_device()
  if device.platform == "tpu":
    return False
  tpu_info.registry.setdefault(device.device_kind,
                               lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5P, 1))
  return True


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot(lhs, rhs, group_sizes)` through the megablox kernels.

  Args:
    lhs: [R, K] rows sorted by group; group g is the next group_sizes[g] rows.
    rhs: [G, K, N], one weight matrix per group.
    group_sizes: int32[G], summing to at most R.
  Returns:
    [R, N] in lhs's dtype; rows after the last group are zeros.
  """
  r, k = lhs.shape
  g, k2, n = rhs.shape
  if k2 != k:
    raise ValueError(f"contraction sizes differ: lhs {lhs.shape}, rhs {rhs.shape}")
  tm = ROW_TILE if r >= ROW_TILE else LANES
  tiling = (tm, _tile(k, COL_TILES), _tile(n, COL_TILES))
  back_tiling = (tm, _tile(n, COL_TILES), _tile(k, COL_TILES))  # the input gradient contracts N
  pad = -r % tm
  out = _gmm(jnp.pad(lhs, ((0, pad), (0, 0))), rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
             tiling, back_tiling, _interpret())
  return _zero_ungrouped(out, group_sizes)[:r]


def _zero_ungrouped(rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return jnp.where((jnp.arange(rows.shape[0]) < jnp.sum(group_sizes))[:, None], rows, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, tiling, back_tiling, interpret):
  return _kernels().gmm(lhs, rhs, group_sizes, precision=jax.lax.Precision.DEFAULT, out_dtype=lhs.dtype,
                        tiling=tiling, interpret=interpret)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, back_tiling, interpret):
  return _gmm(lhs, rhs, group_sizes, tiling, back_tiling, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, back_tiling, interpret, residuals, grad):
  lhs, rhs, group_sizes = residuals
  kernels = _kernels()
  grad = grad.astype(lhs.dtype)
  d_lhs = kernels.gmm(grad, rhs, group_sizes, precision=jax.lax.Precision.DEFAULT, out_dtype=lhs.dtype,
                      tiling=back_tiling, transpose_rhs=True, interpret=interpret)
  d_lhs = _zero_ungrouped(d_lhs, group_sizes)  # the kernel leaves rows in no group unwritten
  d_rhs = kernels.tgmm(lhs.T, grad, group_sizes, precision=jax.lax.Precision.DEFAULT, out_dtype=rhs.dtype,
                       tiling=tiling, num_actual_groups=rhs.shape[0], interpret=interpret)
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
