"""What every multi-process CPU worker of tests/test_multihost.py does first: its flags,
8 // num_processes host devices, the gloo-backed distributed start-up, and one global
2 x 2 x 2 mesh (data, fsdp, tensor): one process gets a plain mesh, two get a slice each
with data parallelism across them (the multi-slice layout)."""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser()
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--out", required=True)
  return p


def start(args):
  """Sets up devices and the distributed runtime (before anything imports jax) and returns
  (MeshConfig, mesh)."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // args.num_processes}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "..")]  # conftest; tasks/
  import jax

  from mm1_jax import distributed, sharding

  jax.config.update("jax_threefry_partitionable", True)
  if args.num_processes > 1:
    assert distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 8 // args.num_processes
  if args.num_processes == 1:
    mesh_cfg = sharding.MeshConfig(shape=(2, 2, 2, 1))
  else:
    mesh_cfg = sharding.MeshConfig(shape=(1, 2, 2, 1), dcn_shape=(args.num_processes, 1, 1, 1))
  mesh = sharding.make_mesh(mesh_cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  return mesh_cfg, mesh
