"""Device mesh and logical-axis sharding rules, in one place.

Parameters and activations are annotated with logical axis names; rule sets map each
name to mesh axes. There are two rule sets, defined here (`DECODER_RULES`,
`ENCODER_RULES`) and overridable in gin: one for the decoder
(`MeshConfig.decoder_rules`, also used for everything outside the image tower) and one
for the image tower, encoder and connector (`MeshConfig.encoder_rules`). Inside the
image tower every logical name is prefixed with "encoder:" (`encoder_axes()`), and
`MeshConfig.rules` is the one flat rule list flax sees: the decoder rules, then the
encoder rules with their names prefixed.

Logical names:
  batch    examples in a batch                   length  sequence / patch positions
  embed    model width                           mlp     MLP / connector hidden width
  heads    attention heads                       kv      per-head width
  vocab    vocabulary                            patch   flattened pixel patch
  layers   the stacked-layer axis of scanned blocks
  expert   the expert axis of sparse (MoE) FFN weights

Mesh axes (`MESH_AXES`): data (pure data parallelism; the axis that crosses slices in
a multi-slice mesh), fsdp (data parallelism with parameters, gradients and optimizer
state sharded), tensor (Megatron-style heads / MLP / vocab), expert (experts of MoE
layers; tokens are batch-sharded over it outside the experts).

A dimension whose size the mesh axes do not divide is left unsharded (and reported
by `param_specs`) rather than failing at compile time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
ENCODER_PREFIX = "encoder:"

# The decoder's rules: FSDP over 'embed', tensor parallelism over heads/mlp/vocab, experts
# over 'expert', batch over data, fsdp and expert. Flax resolves a name to the first rule
# whose mesh axes are all still free in that array, so activations [batch, length, embed]
# get batch -> (data, fsdp, expert) and leave embed unsharded, weights [embed, mlp] get
# (fsdp, tensor), and expert-major activations [expert, batch, ...] fall through to the
# second batch rule, (data, fsdp).
DECODER_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("kv", None),
    ("length", None),
    ("patch", None),
    ("layers", None),
)
# The image tower's (encoder and connector): the same layout with the names it uses (it has
# no vocabulary and no experts).
ENCODER_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("patch", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and sharding rules.

  Attributes:
    shape: size of each mesh axis within a slice, in MESH_AXES order (data, fsdp,
      tensor, expert); one entry may be -1 to take the remaining devices. A 3-entry
      shape (no expert axis) means expert = 1.
    decoder_rules: logical axis -> mesh axes for the decoder (and anything outside
      the image tower).
    encoder_rules: the same for the image encoder and connector; None: the decoder's.
    dcn_shape: slices along each mesh axis for a multi-slice mesh (usually
      (num_slices, 1, 1, 1): data parallelism across slices, the rest inside one);
      None for one slice.
  """

  shape: tuple[int, ...] = (-1, 1, 1, 1)
  decoder_rules: tuple[tuple[str, Any], ...] = DECODER_RULES
  encoder_rules: tuple[tuple[str, Any], ...] | None = ENCODER_RULES
  dcn_shape: tuple[int, ...] | None = None

  @property
  def rules(self) -> list[tuple[str, Any]]:
    """The flat list flax uses: decoder rules, then the prefixed encoder rules."""
    enc = self.decoder_rules if self.encoder_rules is None else self.encoder_rules
    return list(self.decoder_rules) + [(ENCODER_PREFIX + name, axes) for name, axes in enc]

  def _full(self, shape, what: str) -> list[int]:
    shape = list(shape)
    if len(shape) == len(MESH_AXES) - 1:
      shape.append(1)
    if len(shape) != len(MESH_AXES):
      raise ValueError(f"mesh {what} {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    return shape

  def num_slices(self) -> int:
    return math.prod(self._full(self.dcn_shape, "dcn_shape")) if self.dcn_shape else 1

  def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
    """The per-slice (ICI) shape for num_devices devices in all, -1 filled in."""
    shape = self._full(self.shape, "shape")
    slices = self.num_slices()
    if num_devices % slices:
      raise ValueError(f"{num_devices} devices do not split into {slices} slices")
    per_slice = num_devices // slices
    if shape.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self.shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
      if per_slice % known:
        raise ValueError(f"{per_slice} devices per slice do not divide into mesh {self.shape}")
      shape[shape.index(-1)] = per_slice // known
    if math.prod(shape) != per_slice:
      raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices per slice, have {per_slice}")
    return tuple(shape)

  def global_shape(self, num_devices: int) -> dict[str, int]:
    ici = self.resolved_shape(num_devices)
    dcn = self._full(self.dcn_shape, "dcn_shape") if self.dcn_shape else [1] * len(MESH_AXES)
    return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh. With dcn_shape, a hybrid mesh: devices of one slice stay together
  along the ICI shape and slices are laid out along dcn_shape. Devices without a
  slice_index (CPU, GPU) count each process as a slice."""
  devices = list(devices) if devices is not None else jax.devices()
  ici = config.resolved_shape(len(devices))
  if config.num_slices() == 1:
    try:  # topology-aware order on TPU; plain order elsewhere
      arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.asarray(devices).reshape(ici)
    return Mesh(arr, MESH_AXES)
  dcn = config._full(config.dcn_shape, "dcn_shape")
  # TPU devices know their slice; elsewhere (CPU, GPU) each process stands for one.
  by_process = len({getattr(d, "slice_index", None) for d in devices}) < config.num_slices()
  arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                             allow_split_physical_axes=True)
  return Mesh(arr, MESH_AXES)


# --- the image-tower scope ----------------------------------------------------

_scope = threading.local()


@contextlib.contextmanager
def encoder_axes():
  """Inside: logical names given to `partitioned` / `constrain` get the encoder prefix,
  so the image tower is sharded by the encoder rule set."""
  previous = getattr(_scope, "prefix", "")
  _scope.prefix = ENCODER_PREFIX
  try:
    yield
  finally:
    _scope.prefix = previous


def axes(names: Sequence[str | None]) -> tuple[str | None, ...]:
  prefix = getattr(_scope, "prefix", "")
  return tuple(n if n is None or not prefix else prefix + n for n in names)


def partitioned(init, names: Sequence[str | None]):
  """nn.with_logical_partitioning, with the current scope's names."""
  return nn.with_logical_partitioning(init, axes(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """nn.with_logical_constraint, with the current scope's names."""
  return nn.with_logical_constraint(x, axes(names))


# --- from logical names to mesh axes -------------------------------------------


def resolve_spec(shape: Sequence[int], logical: Sequence[str | None] | None, rules,
                 mesh_shape: dict[str, int]) -> tuple[P, list[str]]:
  """A PartitionSpec for an array, and notes on dimensions left unsharded because the
  mesh axes do not divide them."""
  if logical is None:
    return P(), []
  spec = nn.logical_to_mesh_axes(tuple(logical), list(rules))
  out, notes = [], []
  for dim, entry, name in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), logical):
    axes_ = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = math.prod(mesh_shape[a] for a in axes_)
    if axes_ and dim % size:
      notes.append(f"{name}={dim} not divisible by {'x'.join(axes_)}={size}")
      entry = None
    out.append(entry)
  return P(*out), notes


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be flax LogicallyPartitioned boxes.

  A box around an `optax.MaskedNode` (what a per-component optimizer such as
  `optax.multi_transform` keeps in place of another component's parameters) stays a
  MaskedNode: unboxed, the state holds no array there, so it takes no sharding."""
  mesh_shape = dict(mesh.shape)

  def one(leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    if isinstance(value, optax.MaskedNode):
      return value
    return NamedSharding(mesh, resolve_spec(np.shape(value), names, rules, mesh_shape)[0])

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading dim on the 'batch' rule, the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), list(rules))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many shards the batch dimension is split into."""
  spec = batch_sharding(mesh, rules, 1).spec[0]
  axes_ = (spec,) if isinstance(spec, str) else (spec or ())
  return math.prod(mesh.shape[a] for a in axes_)


def target_device():
  """The device kind a traced program is for: the ambient mesh's (`jax.set_mesh`; abstract when
  compiling for a TPU topology from a CPU host), else this process's first device. Kernels read
  its `.platform` to choose between compiling and interpreting."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.devices()[0] if mesh.empty else mesh.abstract_device


def split_axes(names: Sequence[str | None], sizes: dict[str, int]) -> tuple[tuple[str, ...], ...]:
  """Per dimension of an array with logical `names` (the current scope's), the mesh axes of
  more than one device it is split over under the ambient rules (`nn.logical_axis_rules`);
  `sizes` is the mesh's {axis: size}. For code that lays out a `shard_map` by the rules."""
  spec = tuple(nn.logical_to_mesh_axes(axes(names)))
  out = []
  for i in range(len(names)):
    entry = spec[i] if i < len(spec) else None
    out.append(tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if sizes.get(a, 1) > 1))
  return tuple(out)


def data_across_slices(num_slices: int = 1) -> tuple[int, ...] | None:
  """dcn_shape for num_slices slices with data parallelism across them (gin helper)."""
  return None if num_slices <= 1 else (num_slices, 1, 1, 1)
