"""Steady-state train-step benchmark: step time, tokens/s, images/s and MFU.

Uses the real model, optimizer and jitted sharded train step on synthetic batches
(no data pipeline, so it runs where only jax/flax/optax are installed, e.g. a GPU
machine without tensorflow). --json_out writes the run's record (benchmarks/record.py).

  python benchmarks/train_step.py --gin_file=gin/models/mm1_tiny.gin --batch_size=16 \
      --json_out=benchmarks/results/cpu_mm1_tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic_batch(config, batch_size: int, seq_len: int, max_images: int, seed: int = 0) -> dict:
  """A batch with every image slot used: random text, each image's Q tokens after 8 text tokens."""
  import numpy as np

  from mm1_jax import train

  batch = train.dummy_batch(batch_size, seq_len, max_images, config)
  rng = np.random.default_rng(seed)
  q = config.tokens_per_image
  seq = rng.integers(5, config.decoder.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
  for i in range(max_images):
    seq[:, 1 + i * (q + 8): 1 + i * (q + 8) + q] = config.image_token_id
  batch.update(tokens=seq[:, :-1], targets=seq[:, 1:],
               loss_weights=(seq[:, 1:] != config.image_token_id).astype(np.float32),
               positions=np.broadcast_to(np.arange(seq_len), (batch_size, seq_len)).astype(np.int32),
               images=rng.integers(0, 256, batch["images"].shape).astype(np.uint8))
  return batch


def measure(config, batch_size: int, seq_len: int, max_images: int, *, steps: int = 20, warmup: int = 3,
            mesh_shape: tuple[int, ...] = (-1, 1, 1), peak_flops_per_device: float | None = None,
            progress: bool = True, logit_positions: int | None = None) -> dict:
  """Times the jitted train step of `config` (an MM1Config); returns the JSON record.
  `logit_positions`: the LM head only at positions with loss (`train.train`'s option)."""
  import flax.linen as nn
  import jax
  from tqdm import tqdm

  from mm1_jax import flops, optim, sharding, train
  from mm1_jax.model import MM1

  mesh_cfg = sharding.MeshConfig(shape=tuple(mesh_shape))
  mesh = sharding.make_mesh(mesh_cfg)
  tx, schedule = optim.make_optimizer(optim.OptimizerConfig(), 1000)
  batch = synthetic_batch(config, batch_size, seq_len, max_images)
  model = MM1(config)
  state, shardings = train.init_train_state(model, tx, batch, jax.random.PRNGKey(0), mesh, mesh_cfg.rules)
  bsh = {k: sharding.batch_sharding(mesh, mesh_cfg.rules, v.ndim) for k, v in batch.items()}
  step = train.make_train_step(model, tx, schedule, shardings, bsh, logit_positions=logit_positions)
  gbatch = train.global_batch(batch, bsh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    t0 = time.perf_counter()
    state, m = step(state, gbatch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, m = step(state, gbatch)
    jax.block_until_ready(m)
    times = []
    for _ in tqdm(range(steps), desc="timed steps", disable=not progress, leave=False):
      t = time.perf_counter()
      state, m = step(state, gbatch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)

  from mm1_jax import hardware

  backend = jax.default_backend()
  if peak_flops_per_device is None:
    device_peak = hardware.device_peak()
    peak, peak_source = device_peak.flops_per_s, device_peak.derivation
  else:
    peak, peak_source = peak_flops_per_device, "given (--peak_flops_per_device)"
  # Every slot of the synthetic batch is real (one segment a row, every image slot used), so
  # the useful count equals the slot count here; it is taken from the batch all the same.
  step_flops = flops.useful_train_flops(state.params, config, batch)
  median = statistics.median(times)
  return {
      "backend": backend, "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "host": platform.processor() or platform.machine(), "jax": jax.__version__,
      "mesh": dict(mesh.shape), "batch_size": batch_size, "seq_len": seq_len, "max_images": max_images,
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "compile_s": round(compile_s, 2), "steps": steps, "step_s_median": median,
      "step_s_min": min(times), "step_s_p90": sorted(times)[int(0.9 * (len(times) - 1))],
      "tokens_per_s": batch_size * seq_len / median, "images_per_s": batch_size * max_images / median,
      "model_flops_per_step": step_flops, "flops_per_s": step_flops / median,
      "peak_flops_per_device": peak, "peak_source": peak_source,
      "mfu": step_flops / median / (peak * jax.device_count()),
      "final_loss": float(m["loss"]), "logit_positions": logit_positions,
      **({"moe_drop_rate": float(m["moe_drop_rate"])} if "moe_drop_rate" in m else {}),
  }


def main(argv=None) -> dict:
  from mm1_jax import console

  console.prepare_platform("train")
  from mm1_jax import gin_cli

  rest, bindings = gin_cli.split_bindings(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__)
  gin_cli.add_gin_flags(p, required=False, example="gin/models/mm1_tiny.gin (defines MODEL; the default)")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--max_images", type=int, default=3)
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--mesh_shape", default="-1,1,1", help="data,fsdp,tensor")
  p.add_argument("--peak_flops_per_device", type=float, default=None,
                 help="MFU denominator; default: the device's (mm1_jax.hardware: datasheet bf16 peak of a "
                      "GPU/TPU, or the CPU's peak derived from its instruction set)")
  p.add_argument("--logit_positions", type=int, default=None,
                 help="the LM head only at positions with loss, up to this many a row (default: every position)")
  p.add_argument("--json_out", default=None)
  args = p.parse_args(rest)
  args.gin_file = args.gin_file or ["gin/models/mm1_tiny.gin"]
  import gin

  from benchmarks import record as record_lib

  git = record_lib.git_state()
  gin_cli.parse(args, bindings, read_by_command=("MODEL",))
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  record = measure(config, args.batch_size, args.seq_len, args.max_images, steps=args.steps,
                   warmup=args.warmup, mesh_shape=tuple(int(x) for x in args.mesh_shape.split(",")),
                   peak_flops_per_device=args.peak_flops_per_device, logit_positions=args.logit_positions)
  record.update(model_gin=args.gin_file, gin=bindings)
  print(json.dumps(record, indent=1))
  if args.json_out:
    from benchmarks import record as record_lib

    return record_lib.write(Path(args.json_out).resolve(), "train_step", record, git=git)
  return record


if __name__ == "__main__":
  main()
