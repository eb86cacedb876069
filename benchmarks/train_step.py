"""Steady-state train-step benchmark: step time, tokens/s, images/s and MFU.

Uses the real model, optimizer and jitted sharded train step on synthetic batches
(no data pipeline, so it runs where only jax/flax/optax are installed, e.g. a GPU
machine without tensorflow). Writes one JSON record per run.

  python benchmarks/train_step.py --gin_file=gin/models/mm1_tiny.gin --batch_size=16 \
      --peak_flops_per_device=3.2e11 --json_out=benchmarks/results/cpu_mm1_tiny.json
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


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", default="gin/models/mm1_tiny.gin", help="model gin file (defines MODEL)")
  p.add_argument("--gin", action="append", default=[], help="extra gin binding, e.g. COMPUTE_DTYPE='bfloat16'")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--max_images", type=int, default=3)
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--mesh_shape", default="-1,1,1", help="data,fsdp,tensor")
  p.add_argument("--peak_flops_per_device", type=float, default=None,
                 help="MFU denominator; default: 3.2e11 on CPU, 989e12 (H100/H200 bf16 dense) on GPU")
  p.add_argument("--json_out", default=None)
  args = p.parse_args(argv)

  import gin
  import jax
  import flax.linen as nn
  import numpy as np
  from tqdm import tqdm

  from mm1_jax import flops, optim, sharding, train
  from mm1_jax.model import MM1

  gin.add_config_file_search_path(str(REPO))
  gin.parse_config_files_and_bindings([args.gin_file], args.gin)
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()

  mesh_cfg = sharding.MeshConfig(shape=tuple(int(x) for x in args.mesh_shape.split(",")))
  mesh = sharding.make_mesh(mesh_cfg)
  tx, schedule = optim.make_optimizer(optim.OptimizerConfig(), 1000)
  batch = train.dummy_batch(args.batch_size, args.seq_len, args.max_images, config)
  rng = np.random.default_rng(0)
  q = config.tokens_per_image
  seq = rng.integers(5, config.decoder.vocab_size, (args.batch_size, args.seq_len + 1)).astype(np.int32)
  for i in range(args.max_images):  # every image slot used
    seq[:, 1 + i * (q + 8): 1 + i * (q + 8) + q] = config.image_token_id
  batch.update(tokens=seq[:, :-1], targets=seq[:, 1:],
               loss_weights=(seq[:, 1:] != config.image_token_id).astype(np.float32),
               positions=np.broadcast_to(np.arange(args.seq_len), (args.batch_size, args.seq_len)).astype(np.int32),
               images=rng.integers(0, 256, batch["images"].shape).astype(np.uint8))

  model = MM1(config)
  state, shardings = train.init_train_state(model, tx, batch, jax.random.PRNGKey(0), mesh, mesh_cfg.rules)
  bsh = {k: sharding.batch_sharding(mesh, mesh_cfg.rules, v.ndim) for k, v in batch.items()}
  step = train.make_train_step(model, tx, schedule, shardings, bsh)
  gbatch = train.global_batch(batch, bsh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
    t0 = time.perf_counter()
    state, m = step(state, gbatch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      state, m = step(state, gbatch)
    jax.block_until_ready(m)
    times = []
    for _ in tqdm(range(args.steps), desc="timed steps"):
      t = time.perf_counter()
      state, m = step(state, gbatch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)

  backend = jax.default_backend()
  peak = args.peak_flops_per_device or (3.2e11 if backend == "cpu" else 989e12)
  step_flops = flops.train_flops_per_step(state.params, config, args.batch_size, args.seq_len, args.max_images)
  median = statistics.median(times)
  record = {
      "model_gin": args.gin_file, "gin": args.gin, "backend": backend,
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "host": platform.processor() or platform.machine(), "jax": jax.__version__,
      "mesh": dict(mesh.shape), "batch_size": args.batch_size, "seq_len": args.seq_len,
      "max_images": args.max_images,
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "compile_s": round(compile_s, 2), "step_s_median": median,
      "step_s_min": min(times), "step_s_p90": sorted(times)[int(0.9 * (len(times) - 1))],
      "tokens_per_s": args.batch_size * args.seq_len / median,
      "images_per_s": args.batch_size * args.max_images / median,
      "model_flops_per_step": step_flops, "peak_flops_per_device": peak,
      "mfu": step_flops / median / (peak * jax.device_count()),
      "final_loss": float(m["loss"]),
  }
  print(json.dumps(record, indent=1))
  if args.json_out:
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n")
  return record


if __name__ == "__main__":
  main()
