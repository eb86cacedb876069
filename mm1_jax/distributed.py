"""Multi-process start-up: one process per host, one global device mesh.

- Cloud TPU VMs (several workers): `jax.distributed.initialize()` with no arguments
  finds the coordinator, process count and id from the TPU metadata (and, on
  multi-slice queued resources, the MEGASCALE_* values there). tpu_scripts/worker.py
  sets MM1_DISTRIBUTED=tpu on every worker of a multi-host or multi-slice run.
- Elsewhere (GPU hosts, CPU clusters, tests): the coordinator address, process count
  and this process's id come from flags (`--coordinator_address`, `--num_processes`,
  `--process_id`) or the environment (MM1_COORDINATOR_ADDRESS, MM1_NUM_PROCESSES,
  MM1_PROCESS_ID). CPU processes exchange data with gloo collectives.

Each process then feeds only its own rows of the global batch (the loader reads a
per-host share of the records) and `train.global_batch` assembles the global arrays.
"""

from __future__ import annotations

import os

import jax
from jax._src import distributed as jax_distributed  # the runtime's client: jax has no public barrier


def on_multihost_tpu() -> bool:
  """True on a Cloud TPU VM that is one of several workers of a slice (or of several slices)."""
  if os.environ.get("MM1_DISTRIBUTED") == "tpu":
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed when there is more than one process; returns whether it did."""
  coordinator_address = coordinator_address or os.environ.get("MM1_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("MM1_NUM_PROCESSES"):
    num_processes = int(os.environ["MM1_NUM_PROCESSES"])
  if process_id is None and os.environ.get("MM1_PROCESS_ID"):
    process_id = int(os.environ["MM1_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id "
                       "(or MM1_NUM_PROCESSES and MM1_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if num_processes == 1:
      return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True
  if on_multihost_tpu():
    jax.distributed.initialize()
    return True
  return False


def compile_together(jitted, *args, name: str):
  """`jitted` compiled for `args`; with several processes, returned only once every process
  has compiled it. Processes that compile a large step at different speeds otherwise meet
  first inside its collectives, and CPU gloo collectives give up after 30 s waiting for a
  peer at start-up, whatever XLA's collective timeouts say; the distributed runtime's
  barrier (10 minutes) waits for the slowest compile instead."""
  compiled = jitted.lower(*args).compile()
  if jax.process_count() > 1:
    client = jax_distributed.global_state.client
    if client is not None:
      client.wait_at_barrier(f"mm1 compiled {name}", 600_000)
  return compiled
