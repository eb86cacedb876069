"""Device mesh and logical-axis sharding rules, in one place.

Parameters and activations are annotated with logical axis names; the rules
below map each name to mesh axes. Rules are chosen in gin
(`sharding.MeshConfig.rules`), so a run can switch sharding without touching a model.

Logical names:
  batch    examples in a batch                   length  sequence / patch positions
  embed    model width                           mlp     MLP / connector hidden width
  heads    attention heads                       kv      per-head width
  vocab    vocabulary                            patch   flattened pixel patch
  layers   the stacked-layer axis of scanned blocks
  expert   the expert axis of sparse (MoE) FFN weights
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over 'embed', tensor parallelism over heads/mlp/vocab, batch over data and fsdp.
# Flax resolves a name to the first rule whose mesh axes are still free in that
# array, so activations [batch, length, embed] get batch -> (data, fsdp) and
# leave embed unsharded, while weights [embed, mlp] get (fsdp, tensor).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("patch", None),
    ("layers", None),
    ("expert", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and sharding rules.

  Attributes:
    shape: size of each mesh axis, in MESH_AXES order; one entry may be -1 to take
      the remaining devices.
    rules: logical axis -> mesh axes.
  """

  shape: tuple[int, ...] = (-1, 1, 1)
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
    shape = list(self.shape)
    if len(shape) != len(MESH_AXES):
      raise ValueError(f"mesh shape {self.shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self.shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
      if num_devices % known:
        raise ValueError(f"{num_devices} devices do not divide into mesh {self.shape}")
      shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
      raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, have {num_devices}")
    return tuple(shape)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = config.resolved_shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be flax LogicallyPartitioned boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading dim on the 'batch' rule, the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), list(rules))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many shards the batch dimension is split into."""
  spec = batch_sharding(mesh, rules, 1).spec[0]
  axes = (spec,) if isinstance(spec, str) else (spec or ())
  return math.prod(mesh.shape[a] for a in axes)
