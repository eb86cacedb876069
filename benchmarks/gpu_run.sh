#!/usr/bin/env bash
# Train-step figures on one GPU, in one go: versions, a measured bf16/f32 matmul peak,
# then benchmarks/train_step.py on MM1-tiny, bench_small (f32, bf16, larger batch) and
# MM1-3B. Each run writes a JSON record to $OUT (default benchmarks/results/gpu).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh
#
# Needs jax with a GPU backend, flax, optax and gin-config (no tensorflow).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
py=${PYTHON:-python3}
"$py" - <<'PY' 2>&1 | tee "$OUT/peak.txt"
import time, json, jax, jax.numpy as jnp, flax, optax
print(json.dumps({"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                  "device": jax.devices()[0].device_kind, "backend": jax.default_backend()}))
for dtype, prec in (("bfloat16", None), ("float32", None), ("float32", "highest")):
  n = 8192
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), dtype); b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, precision=prec))
  f(a, b).block_until_ready()
  ts = []
  for _ in range(10):
    t = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t)
  ts.sort()
  print(json.dumps({"matmul": n, "dtype": dtype, "precision": prec or "default",
                    "tflops_median": round(2 * n**3 / ts[5] / 1e12, 1)}))
PY
run() {  # name, then train_step.py flags
  local name=$1; shift
  echo "=== $name"
  timeout 240 "$py" benchmarks/train_step.py --json_out="$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -5 "$OUT/$name.log"; }
}
run gpu_mm1_tiny_f32 --gin_file=gin/models/mm1_tiny.gin --batch_size=16 --seq_len=128 --max_images=4 --steps=20
run gpu_bench_small_f32_b8 --gin_file=gin/models/bench_small.gin --batch_size=8 --seq_len=512 --max_images=1 --steps=20
run gpu_bench_small_bf16_b8 --gin_file=gin/models/bench_small.gin --gin.COMPUTE_DTYPE="'bfloat16'" --batch_size=8 --seq_len=512 --max_images=1 --steps=20
run gpu_bench_small_bf16_b64 --gin_file=gin/models/bench_small.gin --gin.COMPUTE_DTYPE="'bfloat16'" --batch_size=64 --seq_len=512 --max_images=1 --steps=20
run gpu_mm1_3b_b2 --gin_file=gin/models/mm1_3b.gin --batch_size=2 --seq_len=2048 --max_images=4 --steps=8 --warmup=2
"$py" - "$OUT" <<'PY'
import json, sys, pathlib
print(f"{'run':28s} {'step_s':>8s} {'tokens/s':>10s} {'MFU':>6s} {'compile_s':>9s}")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  r = json.loads(f.read_text())
  print(f"{f.stem:28s} {r['step_s_median']:8.4f} {r['tokens_per_s']:10.0f} {r['mfu']:6.1%} {r['compile_s']:9.1f}")
PY
