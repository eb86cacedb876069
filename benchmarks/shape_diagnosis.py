"""Shape diagnosis: can a small vision model trained end to end learn shapes-world labels at 64 px?

MM1-tiny's trunk learns colours but not shapes: after pre-training, the attentive probe of
`mm1-probe` on it reaches only about 0.61 on "shape" (kind of the leftmost shape, 3 classes). This study takes the
encoder out of the multimodal model and trains it from scratch, supervised, end to end,
on the probe's own tasks and labels (`mm1_jax.probe.task_labels`):

  count   how many shapes the image holds (1-4)
  colour  the colour of the leftmost shape (6 colours)
  shape   the kind of the leftmost shape (circle, square, triangle)

One model per run carries one head per task, trained on the sum of the tasks' cross
entropies. Variants:

  cnn            a small CNN (conv 5x5 16 -> pool -> conv 32 -> pool -> conv 64 x2 -> pool,
                 GroupNorm + ReLU; flatten 8x8x64 -> dense 256 -> heads); the reference
                 that the task is learnable at this resolution
  vit_p8         the MM1-tiny trunk of gin/models/mm1_tiny.gin (64 px, patch 8, width 128,
                 depth 4, 4 heads, MLP 512) with the learned position embedding it first
                 shipped with, one run per --lrs value: the learning-rate sweep
  vit_p4         the same trunk with patch 4 (16x16 grid, 4x the tokens)
  vit_p8_sincos  the same trunk with the fixed 2-D sin-cos position embedding
                 (ViTConfig.pos_embed="sincos2d") instead of the learned one
  vit_p8_long    the MM1-tiny trunk, --long_factor times the steps (and data)
  vit_p8_mean    (not in the default set) mean pooling instead of the attentive pool
  vit_p8_conv    (not in the default set) a conv stem (ViTConfig.stem = "conv") in place of the
                 linear patch projection; vit_p8_conv_sincos: with sin-cos positions too

The ViT heads pool the trunk's tokens with an attentive pool (one learned query per task,
4 heads, as `mm1-probe` uses), then LayerNorm and a linear classifier; --pool=mean
switches every ViT run to mean pooling. The variants after the sweep train at the
sweep's best learning rate (highest shape accuracy on a validation split, not the test
split) unless --lr is given.

Recipe, the same for every run: AdamW (b2 0.999, weight decay 0.05 on matrices only),
linear warm-up over the first 5% of the steps, then cosine decay to 1% of the peak,
gradient clipping at global norm 1, batch --batch_size.

Data. By default every step draws fresh scenes from the generator (the stream of
mm1-probe's training split, index after index: unlimited data, no example seen twice).
--num_train=N instead trains on the fixed first N scenes of that split (mm1-probe's own
training images), with label-preserving augmentation: the background re-tinted (a new
uniform colour in the generator's range) and a translation of up to --max_shift pixels
with the border extended. No horizontal flips: they change which shape is leftmost.
The test split is mm1-probe's (--num_test scenes of its test stream, seed 0), the
validation split is scenes of the training stream far beyond any training index.

  python -m benchmarks.shape_diagnosis                      # the study: ~21 min on 2 CPU cores
  python -m benchmarks.shape_diagnosis --short              # tiny sizes: checks that it runs (~20 s)
  python -m benchmarks.shape_diagnosis --short --variants=all   # every variant (~40 s)
  python -m benchmarks.shape_diagnosis --variants=cnn,vit_p8 --lrs=1e-3 --steps=2000
  python -m benchmarks.shape_diagnosis --json_out=shape_diagnosis/cpu_2core.json  # under results/

Cost at the defaults (300 steps x 64, 1024 test + 512 validation scenes) on a 2-core
x86-64 CPU: a step takes about 0.24 s (cnn), 0.27-0.34 s (ViT, patch 8) and 1.7 s (ViT,
patch 4); each architecture's first run adds ~5 s of compilation and every run ~5-20 s
of evaluation. Runs: cnn ~1.3 min, vit_p8 ~1.6 min each (x3), vit_p4 ~9 min,
vit_p8_sincos ~1.5 min, vit_p8_long ~4.6 min: about 21 min in all.

Output: a progress line per run, a table (variant, learning rate, steps, test accuracy
per task, chance and majority class per task, seconds), and with --json_out a record
(benchmarks/record.py) holding every run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mm1_jax import console

console.prepare_platform("train")  # CPU-only hosts with libtpu installed: say so before jax starts

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mm1_jax import probe, supervised, vit

TASKS = ("shape", "colour", "count")
IMAGE_SIZE = 64
# gin/models/mm1_tiny.gin's vit.ViTConfig (scan_layers and dtype as there), but with the learned
# position embedding (ViTConfig's default) it first shipped with: the variants add sin-cos.
MM1_TINY_VIT = {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "num_heads": 4, "mlp_dim": 512,
                "scan_layers": False, "dtype": "float32"}
VARIANTS = {
  "cnn": {"model": "cnn"},
  "vit_p8": {"model": "vit", "vit": {}},
  "vit_p4": {"model": "vit", "vit": {"patch_size": 4}},
  "vit_p8_sincos": {"model": "vit", "vit": {"pos_embed": "sincos2d"}},
  "vit_p8_long": {"model": "vit", "vit": {}, "long": True},
  "vit_p8_mean": {"model": "vit", "vit": {}, "pool": "mean"},
  "vit_p8_conv": {"model": "vit", "vit": {"stem": "conv"}},
  "vit_p8_conv_sincos": {"model": "vit", "vit": {"stem": "conv", "pos_embed": "sincos2d"}},
}
DEFAULT_VARIANTS = ("cnn", "vit_p8", "vit_p4", "vit_p8_sincos", "vit_p8_long")
SHORT_VARIANTS = ("cnn", "vit_p8", "vit_p8_long")  # --short: one compilation per architecture dominates
VAL_OFFSET = 100_000_000  # validation indices of the training stream; training never gets there
BG_RANGE = (225, 256)  # shapes_world.render's background tint, per channel


# --- data --------------------------------------------------------------------


def scenes(stream: str, start: int, n: int, seed: int = 0):
  """(uint8[n, 64, 64, 3], {task: int32[n]}) of scenes start..start+n-1 of a probe stream."""
  return probe.scenes(stream, start, n, IMAGE_SIZE, TASKS, seed)


def augment(key, images: jax.Array, max_shift: int) -> jax.Array:
  """Label-preserving: a fresh background tint, then a shift of up to max_shift px (edge-extended).
  No flips: they change which shape is leftmost."""
  b, s, _, _ = images.shape
  k_bg, k_shift = jax.random.split(key)
  corner = images[:, :1, :1, :]  # the generator leaves every border pixel as background
  is_bg = jnp.all(images == corner, axis=-1, keepdims=True)
  tint = jax.random.randint(k_bg, (b, 1, 1, 3), *BG_RANGE).astype(jnp.uint8)
  x = jnp.where(is_bg, tint, images)
  if max_shift <= 0:
    return x
  x = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
  offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * max_shift + 1)
  return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (s, s, 3)))(x, offsets)



# --- models ------------------------------------------------------------------


class CNN(nn.Module):
  """A small CNN with one linear head per task; flattening keeps where things are."""

  classes: tuple[tuple[str, int], ...]

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 255.0 - 0.5
    for i, (ch, k, pool) in enumerate(((16, 5, True), (32, 3, True), (64, 3, False), (64, 3, True))):
      x = nn.Conv(ch, (k, k), padding="SAME", name=f"conv{i}")(x)
      x = nn.relu(nn.GroupNorm(num_groups=8, name=f"gn{i}")(x))
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(256, name="fc")(x.reshape(x.shape[0], -1)))
    return {t: nn.Dense(n, name=f"head_{t}")(x) for t, n in self.classes}


def build_model(spec: dict, pool: str):
  classes = tuple(supervised.num_classes(TASKS).items())
  if spec["model"] == "cnn":
    return CNN(classes), None
  config = vit.ViTConfig(**{**MM1_TINY_VIT, **spec["vit"]})
  return supervised.ViTClassifier(config, classes, pool=spec.get("pool", pool)), config


# --- training ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
  variant: str
  lr: float
  steps: int
  batch_size: int
  num_train: int  # 0: fresh scenes every step
  augment: bool
  max_shift: int
  weight_decay: float
  seed: int
  pool: str


# The learning rate is an argument of the compiled step (optax.inject_hyperparams), so runs
# of one architecture (the sweep, the long run) share one compilation.
_COMPILED: dict = {}


def compiled(model, augment_images: bool, max_shift: int, weight_decay: float):
  """(init, step, predict, tx) for this model and recipe, jitted once per architecture."""
  key = (repr(model), augment_images, max_shift, weight_decay)
  if key in _COMPILED:
    return _COMPILED[key]
  tx = optax.inject_hyperparams(supervised.make_optimizer)(learning_rate=0.0, weight_decay=weight_decay)

  preprocess = (lambda rng, images: augment(rng, images, max_shift)) if augment_images else None
  init, step, predict = supervised.compile_steps(model, tx, IMAGE_SIZE, preprocess)
  _COMPILED[key] = (init, step, predict, tx)
  return _COMPILED[key]


def _batches(cfg: RunConfig, train_set):
  """Yields (images, {task: labels}) per step; fresh scenes are generated one step ahead."""
  if cfg.num_train:
    images, labels = train_set
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.steps):
      idx = rng.choice(len(images), size=min(cfg.batch_size, len(images)), replace=False)
      yield images[idx], {t: v[idx] for t, v in labels.items()}
    return
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    nxt = pool.submit(scenes, "probe_train", 0, cfg.batch_size)
    for k in range(cfg.steps):
      batch = nxt.result()
      if k + 1 < cfg.steps:
        nxt = pool.submit(scenes, "probe_train", (k + 1) * cfg.batch_size, cfg.batch_size)
      yield batch


def train_run(cfg: RunConfig, spec: dict, train_set, val_set, test_set, eval_chunk: int = 256) -> dict:
  t_start = time.perf_counter()
  model, vit_config = build_model(spec, cfg.pool)
  init, step, predict, _ = compiled(model, cfg.augment, cfg.max_shift, cfg.weight_decay)
  k_init, k_aug = jax.random.split(jax.random.PRNGKey(cfg.seed))
  params, opt = init(k_init)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  schedule = supervised.lr_schedule(cfg.lr, cfg.steps)

  t0 = time.perf_counter()
  first_step_s = None
  losses_log = []
  for k, (images, labels) in enumerate(_batches(cfg, train_set)):
    params, opt, losses = step(params, opt, jnp.float32(schedule(k)), jax.random.fold_in(k_aug, k),
                               jnp.asarray(images), {t: jnp.asarray(v) for t, v in labels.items()})
    if k == 0:
      jax.block_until_ready(params)
      first_step_s = time.perf_counter() - t0
      t1 = time.perf_counter()
    if k >= cfg.steps - max(1, cfg.steps // 10):  # mean training loss over the last tenth
      losses_log.append({t: float(v) for t, v in losses.items()})
  jax.block_until_ready(params)
  train_s = time.perf_counter() - t0
  step_s = (time.perf_counter() - t1) / max(1, cfg.steps - 1)
  val = supervised.accuracy(predict, params, *val_set, chunk=eval_chunk)
  test = supervised.accuracy(predict, params, *test_set, chunk=eval_chunk)
  vit_fields = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "pos_embed", "norm", "final_norm", "stem",
                "stem_width")
  return {"variant": cfg.variant, "lr": cfg.lr, "steps": cfg.steps, "batch_size": cfg.batch_size,
          "examples_seen": cfg.steps * cfg.batch_size,
          "data": f"fixed {cfg.num_train}" if cfg.num_train else "fresh",
          "augment": cfg.augment, "pool": None if vit_config is None else spec.get("pool", cfg.pool),
          "vit": None if vit_config is None else {k: getattr(vit_config, k) for k in vit_fields},
          "params": n_params, "test_accuracy": test, "val_accuracy": val,
          "final_train_loss": {t: float(np.mean([d[t] for d in losses_log])) for t in TASKS},
          "first_step_s": round(first_step_s, 3), "step_s": round(step_s, 4), "train_s": round(train_s, 2),
          "seconds": round(time.perf_counter() - t_start, 2)}


# --- the study -----------------------------------------------------------------


def chance_and_majority(labels) -> tuple[dict, dict]:
  nc = supervised.num_classes(TASKS)
  chance = {t: 1.0 / nc[t] for t in TASKS}
  majority = {t: float(max((labels[t] == k).mean() for k in range(nc[t]))) for t in TASKS}
  return chance, majority


def format_table(runs: list[dict], chance: dict, majority: dict) -> str:
  rows = [("variant", "lr", "steps", *TASKS, "s/step", "seconds")]
  for r in runs:
    rows.append((r["variant"], f"{r['lr']:.0e}", str(r["steps"]),
                 *(f"{r['test_accuracy'][t]:.3f}" for t in TASKS), f"{r['step_s']:.3f}", f"{r['seconds']:.0f}"))
  rows.append(("chance", "", "", *(f"{chance[t]:.3f}" for t in TASKS), "", ""))
  rows.append(("majority class", "", "", *(f"{majority[t]:.3f}" for t in TASKS), "", ""))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.shape_diagnosis", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default=None,
                 help=f"comma-separated, from {', '.join(VARIANTS)}, or 'all' (default: "
                      f"{','.join(DEFAULT_VARIANTS)}; --short: {','.join(SHORT_VARIANTS)})")
  p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; --short 12)")
  p.add_argument("--batch_size", type=int, default=None, help="default 64; --short 8")
  p.add_argument("--num_train", type=int, default=0,
                 help="train on this many fixed scenes (augmented); 0: fresh scenes every step")
  p.add_argument("--fresh_data", action="store_true", help="fresh scenes every step (the default; overrides --num_train)")
  p.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                 help="background re-tint + translation; auto: on for --num_train, off for fresh data")
  p.add_argument("--max_shift", type=int, default=3, help="translation range of the augmentation, pixels")
  p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="vit_p8's learning-rate sweep")
  p.add_argument("--lr", type=float, default=None,
                 help="learning rate of the other ViT variants (default: the sweep's best on validation)")
  p.add_argument("--cnn_lr", type=float, default=1e-3)
  p.add_argument("--weight_decay", type=float, default=0.05)
  p.add_argument("--long_factor", type=int, default=3, help="vit_p8_long's steps, as a multiple of --steps")
  p.add_argument("--pool", choices=("attn", "mean"), default="attn", help="ViT head pooling")
  p.add_argument("--num_test", type=int, default=None, help="test scenes (mm1-probe's test split; default 1024)")
  p.add_argument("--num_val", type=int, default=None, help="validation scenes (default 512)")
  p.add_argument("--seed", type=int, default=0, help="initialisation, batch order and augmentation")
  p.add_argument("--short", action="store_true",
                 help="tiny sizes (12 steps x 8, 64 test scenes): checks that it runs (~20 s)")
  p.add_argument("--json_out", default=None, help="write the run's record (benchmarks/record.py) here")
  args = p.parse_args(argv)

  from benchmarks import record as record_lib

  git = record_lib.git_state() if args.json_out else None  # the code as it was when the runs began
  chosen = args.variants or ",".join(SHORT_VARIANTS if args.short else DEFAULT_VARIANTS)
  variants = list(VARIANTS) if chosen == "all" else [v.strip() for v in chosen.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    p.error(f"unknown variant {unknown[0] if unknown else '(none)'}; choose from {', '.join(VARIANTS)}")
  lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
  if not lrs:
    p.error("--lrs is empty")
  steps = args.steps or (12 if args.short else 300)
  batch_size = args.batch_size or (8 if args.short else 64)
  num_test = args.num_test or (64 if args.short else 1024)
  num_val = args.num_val or (32 if args.short else 512)
  num_train = 0 if args.fresh_data else args.num_train
  augment = {"on": True, "off": False, "auto": bool(num_train)}[args.augment]

  t0 = time.perf_counter()
  test_set = probe.make_split("test", num_test, IMAGE_SIZE, TASKS)
  val_set = scenes("probe_train", VAL_OFFSET, num_val)
  train_set = probe.make_split("train", num_train, IMAGE_SIZE, TASKS) if num_train else None
  chance, majority = chance_and_majority(test_set[1])
  print(f"data: {num_test} test + {num_val} validation scenes"
        + (f" + {num_train} fixed training scenes" if num_train else ", fresh training scenes every step")
        + f" in {time.perf_counter() - t0:.1f} s; {jax.device_count()} {jax.devices()[0].platform} device(s)",
        flush=True)

  plan = []  # (variant, lr or None for "the sweep's best", steps)
  for v in variants:
    spec = VARIANTS[v]
    if v == "cnn":
      plan.append((v, args.cnn_lr, steps))
    elif v == "vit_p8":
      plan.extend((v, lr, steps) for lr in lrs)
    else:
      plan.append((v, args.lr, steps * (args.long_factor if spec.get("long") else 1)))
  plan.sort(key=lambda e: {"cnn": 0, "vit_p8": 1}.get(e[0], 2))  # the sweep before its users

  print("runs: " + ", ".join(f"{v} ({'lr ' + format(lr, '.0e') if lr else 'best lr'}, {n} steps)"
                             for v, lr, n in plan), flush=True)
  runs = []
  for i, (v, lr, n_steps) in enumerate(plan):
    if lr is None:
      sweep = [r for r in runs if r["variant"] == "vit_p8"]
      lr = (max(sweep, key=lambda r: (r["val_accuracy"]["shape"], -r["lr"]))["lr"] if sweep
            else lrs[len(lrs) // 2])
    cfg = RunConfig(v, lr, n_steps, batch_size, num_train, augment, args.max_shift, args.weight_decay,
                    args.seed, args.pool)
    r = train_run(cfg, VARIANTS[v], train_set, val_set, test_set, eval_chunk=min(256, num_test, num_val))
    runs.append(r)
    acc = "  ".join(f"{t} {r['test_accuracy'][t]:.3f}" for t in TASKS)
    print(f"[{i + 1}/{len(plan)}] {v:<13} lr {lr:.0e}  {n_steps} steps x {batch_size}: {acc}  "
          f"(val shape {r['val_accuracy']['shape']:.3f}, loss {sum(r['final_train_loss'].values()):.3f}, "
          f"{r['params']:,} params)  {r['seconds']:.1f} s = first step {r['first_step_s']:.1f} s "
          f"+ {r['step_s']:.3f} s/step", flush=True)

  print()
  print(format_table(runs, chance, majority))
  total = time.perf_counter() - t0
  print(f"\ntotal {total:.0f} s", flush=True)
  figures = {"runs": runs, "chance": chance, "majority_class": majority, "total_s": round(total, 1),
             "settings": {"steps": steps, "batch_size": batch_size, "num_train": num_train,
                          "augment": augment, "max_shift": args.max_shift, "lrs": lrs, "lr": args.lr,
                          "cnn_lr": args.cnn_lr, "weight_decay": args.weight_decay,
                          "long_factor": args.long_factor, "pool": args.pool, "num_test": num_test,
                          "num_val": num_val, "seed": args.seed, "tasks": list(TASKS)}}
  if args.json_out:
    record_lib.write(args.json_out, "shape_diagnosis", figures, git=git, short=args.short,
                     variants={v: VARIANTS[v] for v in variants})
  return figures


if __name__ == "__main__":
  main()
