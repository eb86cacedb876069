"""`mm1-probe`: attentive probing of a frozen image trunk on shapes-world tasks.

How pre-trained image encoders are judged (AIM, AIMv2): the trunk is frozen, its patch
features are computed once, and a small attentive probe -- one learned query
cross-attending to the patches, LayerNorm, a linear classifier -- is trained on them per
task. Better features give higher held-out accuracy from the same probe and budget.

Tasks, labels read off generated shapes-world scenes (streams disjoint from the corpus):
  count     how many shapes the image holds (1-4)
  colour    the colour of the leftmost shape (6 colours)
  shape     the kind of the leftmost shape (circle, square, triangle)
  colour@i  the colour of the i-th shape from the left (i = 1, 2, 3; 0 is the leftmost),
  shape@i   its kind; "none" when the scene has no i-th shape. Not probed by default:
            --tasks names them (`mm1-supervised` trains on them). They are also scored on
            the scenes that hold an i-th shape ("where present"): over all scenes "none"
            dominates, and reading the count alone scores well

  mm1-probe --gin_file=gin/experiments/aim_pretrain.gin --init_from=/tmp/aim/checkpoints --baseline
  mm1-probe --gin_file=gin/experiments/quickstart.gin --init_from=/tmp/mm1_quickstart/checkpoints

The trunk is the `encoder` of the gin file's MODEL (MM1, AIM, AIMv2, contrastive): --init_from
names a run's checkpoints/ folder (newest step) or an `mm1-convert import` output. It
runs with bidirectional attention, as MM1 uses it. --baseline also probes MODEL's trunk as
`mm1-train` initialises it with `train.train.seed` (the gin file's, else 0; --init_seed
overrides): for a run without `init_from`, the very weights it began with, the reference
its pre-training must beat (random trunks of other draws probe differently). A run that
started from a pre-trained trunk compares with that trunk's own probe. Output:
a table, and with --json_out one JSON record (per task: accuracy, chance, examples).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mm1_jax import gin_checks, gin_cli, pretrained, vit
from mm1_jax.data import shapes_world as sw

TASKS = ("count", "colour", "shape")
# The shapes right of the leftmost, by position: mm1-supervised --labels=every_shape.
POSITION_TASKS = tuple(f"{a}@{i}" for i in range(1, sw.MAX_SHAPES) for a in ("colour", "shape"))


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  num_train: int = 2048
  num_test: int = 512
  steps: int = 400
  batch_size: int = 128
  learning_rate: float = 3e-3
  weight_decay: float = 0.05
  num_heads: int = 4
  seed: int = 0
  init_seed: int = 0  # train.train.seed of the run whose starting trunk --baseline probes


def task_labels() -> dict[str, tuple[tuple[str, ...], Callable]]:
  """{task: (class names, scene -> class index)}."""
  colours = tuple(sw.COLOURS)
  out = {
      "count": (tuple(str(n) for n in range(1, sw.MAX_SHAPES + 1)), lambda scene: len(scene) - 1),
      "colour": (colours, lambda scene: colours.index(scene[0].colour)),
      "shape": (sw.SHAPES, lambda scene: sw.SHAPES.index(scene[0].kind)),
  }
  for i in range(1, sw.MAX_SHAPES):  # "none" (the last class) when the scene has no i-th shape
    out[f"colour@{i}"] = ((*colours, "none"),
                          lambda scene, i=i: colours.index(scene[i].colour) if i < len(scene) else len(colours))
    out[f"shape@{i}"] = ((*sw.SHAPES, "none"),
                         lambda scene, i=i: sw.SHAPES.index(scene[i].kind) if i < len(scene) else len(sw.SHAPES))
  return out


# Dense labels, one per patch of the trunk's grid (row-major, as its tokens): the kind and the
# colour of the shape covering most of the patch, "none" (the last class) where shapes cover
# less than a quarter of it. mm1-supervised --labels=patches trains on them.
PATCH_TASKS = ("shape@patch", "colour@patch")
PATCH_MIN_COVER = 0.25


def patch_classes() -> dict[str, tuple[str, ...]]:
  return {"shape@patch": (*sw.SHAPES, "none"), "colour@patch": (*sw.COLOURS, "none")}


def patch_labels(scene: list[sw.Shape], image_size: int, patch_size: int) -> dict[str, np.ndarray]:
  """{"shape@patch", "colour@patch": int32[(image_size // patch_size) ** 2]} of one scene."""
  g = image_size // patch_size
  own = sw.owners(scene, image_size)[:g * patch_size, :g * patch_size]
  patches = own.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)
  cover = np.stack([(patches == i + 1).sum(-1) for i in range(len(scene))], -1)  # [patches, shapes]
  top = cover.argmax(-1)
  shown = cover.max(-1) >= PATCH_MIN_COVER * patch_size ** 2
  colours = tuple(sw.COLOURS)
  kind = np.array([sw.SHAPES.index(s.kind) for s in scene])[top]
  colour = np.array([colours.index(s.colour) for s in scene])[top]
  return {"shape@patch": np.where(shown, kind, len(sw.SHAPES)).astype(np.int32),
          "colour@patch": np.where(shown, colour, len(colours)).astype(np.int32)}


def make_split(split: str, n: int, image_size: int, tasks=TASKS, seed: int = 0, patch_size: int | None = None):
  """(uint8[n, S, S, 3] images, {task: int32[n] labels}) of the probe's generated scenes (`scenes`)."""
  return scenes({"train": "probe_train", "test": "probe_test"}[split], 0, n, image_size, tasks, seed, patch_size)


def scenes(stream: str, start: int, n: int, image_size: int, tasks=TASKS, seed: int = 0,
           patch_size: int | None = None):
  """Scenes start .. start + n - 1 of a shapes-world stream, labelled: (uint8[n, S, S, 3], {task: int32[n]});
  with `patch_size` also the PATCH_TASKS' labels, int32[n, patches]."""
  labels_of = task_labels()
  images = np.zeros((n, image_size, image_size, 3), np.uint8)
  labels = {t: np.zeros(n, np.int32) for t in tasks}
  if patch_size:
    labels.update({t: np.zeros((n, (image_size // patch_size) ** 2), np.int32) for t in PATCH_TASKS})
  for i in range(n):
    rng = sw._rng(seed, stream, start + i)
    scene = sw.sample_scene(rng, image_size)
    images[i] = sw.render(scene, rng, image_size)
    for t in tasks:
      labels[t][i] = labels_of[t][1](scene)
    if patch_size:
      for t, v in patch_labels(scene, image_size, patch_size).items():
        labels[t][i] = v
  return images, labels


def initial_trunk(model_config, seed: int = 0):
  """The `encoder` parameters MODEL starts from in `mm1-train` with `train.train.seed = seed`:
  the whole model initialised from PRNGKey(seed), as the training does, and its encoder
  taken. (The trunk initialised on its own from the same key would be another draw: the
  model derives its encoder's key from its own.)"""
  c = model_config.encoder
  ids = jnp.zeros((1, 8), jnp.int32)
  images = jnp.zeros((1, 1, c.image_size, c.image_size, 3), jnp.uint8)
  model = model_config.build()
  # Jitted: XLA drops the initialisers of everything but the encoder (a large decoder is
  # never allocated), and the draw is the one the training's jitted init makes.
  init = jax.jit(lambda key: nn.meta.unbox(model.init(key, ids, images, jnp.ones_like(ids), ids)["params"]["encoder"]))
  return init(jax.random.PRNGKey(seed))


def trunk_params(model_config, init_from: str | None, seed: int = 0):
  """The `encoder` parameters of MODEL: loaded from `init_from`, else as a run of seed `seed`
  initialises them (`initial_trunk`)."""
  if init_from is None:
    return initial_trunk(model_config, seed)
  c = model_config.encoder
  images = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.uint8)
  params = {"encoder": nn.meta.unbox(vit.ViT(c).init(jax.random.PRNGKey(seed), images)["params"])}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, params)
  source, parts = pretrained.parse_source(init_from)
  if parts is not None and parts != ("encoder",):
    raise ValueError(f"mm1-probe reads the encoder part only, not {parts}")
  return pretrained.load_pretrained(params, shardings, [f"{source}:encoder"], model_config)["encoder"]


def features(encoder_config, params, images, batch_size: int = 64, progress: bool = False):
  """Frozen trunk features float32[n, L, D] (bidirectional attention, final norm)."""
  apply = jax.jit(lambda p, x: vit.ViT(encoder_config).apply({"params": p}, x))
  out = []
  for i in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)  # one compiled shape for every chunk
    x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
    out.append(np.asarray(apply(params, x), np.float32)[:len(chunk)])
  return np.concatenate(out)


def _probe_module(num_classes: int, num_heads: int):
  class AttentiveProbe(nn.Module):
    """One learned query attends over the frozen patch features; LayerNorm; linear."""

    @nn.compact
    def __call__(self, feats):
      b, _, d = feats.shape
      query = self.param("query", nn.initializers.normal(0.02), (1, 1, d))
      x = nn.LayerNorm(use_scale=False, use_bias=False, name="ln_in")(feats)
      pooled = nn.MultiHeadDotProductAttention(num_heads=num_heads, name="attn")(
          jnp.broadcast_to(query, (b, 1, d)), x)[:, 0]
      return nn.Dense(num_classes, name="classifier")(nn.LayerNorm(name="ln_out")(pooled))

  return AttentiveProbe()


def train_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                config: ProbeConfig) -> float:
  """Trains one attentive probe; returns its accuracy on the test features."""
  return float((probe_predictions(train_feats, train_labels, test_feats, num_classes, config) == test_labels).mean())


def probe_predictions(train_feats, train_labels, test_feats, num_classes: int, config: ProbeConfig) -> np.ndarray:
  """Trains one attentive probe; returns its predicted class per test feature."""

  module = _probe_module(num_classes, config.num_heads)
  key = jax.random.PRNGKey(config.seed)
  params = module.init(key, jnp.asarray(train_feats[:2]))["params"]
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(config.seed)
  n = len(train_feats)
  for _ in range(config.steps):
    idx = rng.choice(n, size=min(config.batch_size, n), replace=False)
    params, opt, _ = step(params, opt, jnp.asarray(train_feats[idx]), jnp.asarray(train_labels[idx]))
  predict = jax.jit(lambda p, x: jnp.argmax(module.apply({"params": p}, x), -1))
  return np.concatenate([np.asarray(predict(params, jnp.asarray(test_feats[i:i + 256])))
                         for i in range(0, len(test_feats), 256)])


def place_scores(predicted: np.ndarray, labels: np.ndarray, none_class: int) -> dict:
  """A place task (`colour@i`, `shape@i`) scored on the scenes that hold an i-th shape only.

  Over all scenes "none" dominates these tasks (most scenes have fewer than four shapes), so a
  probe that reads the count alone scores well; here the kind or colour itself is asked for.
  """
  present = labels != none_class
  n = int(present.sum())
  if not n:
    return {"present_scenes": 0}
  counts = np.bincount(labels[present], minlength=none_class)
  return {"present_scenes": n, "accuracy_where_present": float((predicted[present] == labels[present]).mean()),
          "majority_class_where_present": float(counts.max() / n)}


def run_probe(model_config, init_from: str | None, *, tasks=TASKS, config: ProbeConfig = ProbeConfig(),
              baseline: bool = False, progress: bool = True) -> dict:
  """Probes the trunk (and with `baseline` the same trunk at random init) on `tasks`."""
  say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)  # noqa: E731
  enc = model_config.encoder
  say(f"generating {config.num_train} + {config.num_test} shapes-world images at {enc.image_size} px")
  train_images, train_labels = make_split("train", config.num_train, enc.image_size, tasks)
  test_images, test_labels = make_split("test", config.num_test, enc.image_size, tasks)
  trunks = {}
  if init_from is not None:
    trunks["pretrained"] = trunk_params(model_config, init_from)
  if init_from is None or baseline:
    trunks["random_init"] = trunk_params(model_config, None, seed=config.init_seed)
  names = task_labels()
  result = {"init_from": init_from, "image_size": enc.image_size, "num_train": config.num_train,
            "num_test": config.num_test, "probe_steps": config.steps, "tasks": {}}
  for trunk, params in trunks.items():
    t0 = time.perf_counter()
    tr = features(enc, params, train_images, progress=progress)
    te = features(enc, params, test_images, progress=progress)
    say(f"{trunk}: features {tr.shape} in {time.perf_counter() - t0:.1f} s")
    for task in tasks:
      classes = names[task][0]
      predicted = probe_predictions(tr, train_labels[task], te, len(classes), config)
      acc = float((predicted == test_labels[task]).mean())
      majority = float(max((test_labels[task] == k).mean() for k in range(len(classes))))
      entry = result["tasks"].setdefault(task, {"classes": len(classes), "majority_class": majority})
      entry[trunk] = acc
      say(f"  {task:<7} {trunk:<12} accuracy {acc:.3f} (majority class {majority:.3f})")
      if task in POSITION_TASKS:  # the last class is "none"
        place = place_scores(predicted, test_labels[task], len(classes) - 1)
        entry.update({k.replace("accuracy", trunk): v for k, v in place.items()})
  return result


def format_table(result: dict) -> str:
  cols = [c for c in ("pretrained", "random_init") if any(c in t for t in result["tasks"].values())]
  rows = [("task", *cols, "majority class")]
  for task, t in result["tasks"].items():
    rows.append((task, *(f"{t[c]:.3f}" for c in cols), f"{t['majority_class']:.3f}"))
    if "majority_class_where_present" in t:  # a place task, on the scenes that hold that place
      rows.append((f"  where present ({t['present_scenes']})", *(f"{t[f'{c}_where_present']:.3f}" for c in cols),
                   f"{t['majority_class_where_present']:.3f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  p = argparse.ArgumentParser(prog="mm1-probe", description=__doc__)
  gin_cli.add_gin_flags(p, example="gin/experiments/aim_pretrain.gin (MODEL's encoder is probed)")
  p.add_argument("--init_from", default=None,
                 help="a run's checkpoints/ folder or an mm1-convert import (default: random init)")
  p.add_argument("--baseline", action="store_true", help="also probe the randomly initialised trunk")
  p.add_argument("--tasks", default=",".join(TASKS),
                 help=f"comma-separated, from {', '.join(TASKS + POSITION_TASKS)} (default {','.join(TASKS)})")
  p.add_argument("--num_train", type=int, default=ProbeConfig.num_train)
  p.add_argument("--num_test", type=int, default=ProbeConfig.num_test)
  p.add_argument("--steps", type=int, default=ProbeConfig.steps, help="probe optimizer steps per task")
  p.add_argument("--seed", type=int, default=0, help="the probes' seed (initialisation, batches)")
  p.add_argument("--init_seed", type=int, default=None,
                 help="the --baseline trunk's: train.train.seed of the run (default: the gin file's, else 0)")
  p.add_argument("--json_out", default=None, help="also write the result as JSON here")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(rest)
  tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
  unknown = [t for t in tasks if t not in TASKS + POSITION_TASKS]
  if unknown or not tasks:
    p.error(f"unknown task {unknown[0] if unknown else '(none)'}; choose from {', '.join(TASKS + POSITION_TASKS)}")
  if args.init_from is not None and not Path(pretrained_dir(args.init_from)).exists():
    p.error(f"--init_from={args.init_from}: no such folder")
  gin_cli.parse(args, bindings, read_by_command=("MODEL",))
  model_config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  init_seed = args.init_seed if args.init_seed is not None else _bound("train.train.seed", 0)
  config = ProbeConfig(num_train=args.num_train, num_test=args.num_test, steps=args.steps, seed=args.seed,
                       init_seed=init_seed)
  try:
    result = run_probe(model_config, args.init_from, tasks=tasks, config=config, baseline=args.baseline,
                       progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"mm1-probe: {e}", file=sys.stderr)
    return 2
  print(format_table(result))
  if args.json_out:
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
  return 0


def _bound(name: str, default):
  """The gin binding `name` (a macro followed to its value), or `default` where the
  configuration leaves it unset."""
  try:
    value = gin_checks._value(gin.query_parameter(name), [])  # noqa: SLF001
  except ValueError:
    return default
  if not isinstance(value, int):
    raise ValueError(f"{name} is bound to {value!r}, not an integer: give --init_seed")
  return value


def pretrained_dir(entry: str) -> str:
  return pretrained.parse_source(entry)[0]


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("probe"))
