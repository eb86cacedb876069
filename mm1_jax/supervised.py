"""`mm1-supervised`: pre-train MODEL's image encoder on labelled shapes-world scenes.

MM1 starts from an image encoder that already sees (a pre-trained CLIP). A model of the
bundled world pre-trained from scratch on captions learns colours but never shapes: its
trunk is not taught them in 600 steps, and no decoder can read out what the trunk does
not hold (docs/results.md, "Can the models see shapes?"). This command gives the bundled
world its pre-trained encoder by the original ViT recipe, supervised classification:

  the trunk        MODEL's `encoder` (a `vit.ViTConfig`), exactly as MM1 builds it, so
                   that it hands over with `train.train.init_from = ["OUT:encoder"]`
  heads            one attention layer pooling the trunk's tokens with a learned query per
                   task, a shared LayerNorm, a linear classifier per task; trained end to
                   end with the trunk on the sum of the tasks' softmax cross-entropies
  labels           read off generated scenes (`mm1_jax.probe.task_labels`), --labels:
                   every_shape  (the default) the kind and the colour of every shape, by
                                its place from the left ("none" past the last), and the
                                number of shapes, as VQA asks about any of them
                                (docs/results.md, "Where the VQA answers are lost")
                   leftmost     the kind and the colour of the leftmost shape only, and
                                the number of shapes (mm1-probe's default tasks)
                   patches      every_shape's, and per patch of the trunk's grid the kind
                                and the colour of the shape covering it ("none" on the
                                background; `probe.patch_labels`), read by a linear head
                                from each token, so that every token says what it shows
  data             fresh scenes every step from the world's own "supervised_train"
                   stream, apart from the corpus, the evaluation and mm1-probe's scenes
  recipe           AdamW (weight decay on matrices only), linear warm-up over the first
                   5 % of the steps, cosine decay to 1 % of the peak, clip at global norm 1

Writes OUT/params ({"encoder": the trunk}, the layout `mm1-convert import` writes),
OUT/result.json (settings, held-out accuracy per task on scenes of mm1-probe's test stream,
seconds) and prints the accuracies. The heads are left behind. An OUT that already holds
a trunk trained with the same encoder and settings is reused (the quickstart can be
rerun); other settings stop with an error unless --overwrite. The job keeps no
checkpoint: at the defaults it is a few minutes on 2 CPU cores.

  mm1-supervised --gin_file=gin/experiments/quickstart.gin --out=/tmp/mm1_quickstart_encoder
  mm1-probe --gin_file=gin/experiments/quickstart.gin --init_from=/tmp/mm1_quickstart_encoder

These labels are the world's own and the probes ask the same questions: a trunk trained
here is expected to probe well, and `mm1-probe` then measures what MM1 pre-training keeps
of it, not how general it is. With real data the encoder comes from `mm1-convert import`
(CLIP, SigLIP, AIMv2) or from `mm1-train` with an encoder objective (AIM, AIMv2, CLIP /
SigLIP; docs/sft_and_encoders.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import time

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mm1_jax import checkpoint, gin_cli, optim, paths, probe, vit

TASKS = probe.TASKS
# --labels: the scene tasks; the choices in PER_PATCH also train probe.PATCH_TASKS, a label per token.
LABELS = {"leftmost": probe.TASKS, "every_shape": probe.TASKS + probe.POSITION_TASKS,
          "patches": probe.TASKS + probe.POSITION_TASKS}
PER_PATCH = ("patches",)
STREAM = "supervised_train"


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
  """steps x batch_size fresh scenes; the peak learning rate of the warm-up / cosine schedule."""

  steps: int = 1200
  batch_size: int = 64
  learning_rate: float = 1e-3
  weight_decay: float = 0.05
  seed: int = 0
  num_test: int = 1024
  labels: str = "every_shape"  # a key of LABELS


class ViTClassifier(nn.Module):
  """A `vit.ViT` trunk (named "trunk"); per task an attentive pool (or the token mean), LayerNorm, linear.
  Per `dense` task, a linear head on every token (after a LayerNorm): logits [B, tokens, classes]."""

  config: vit.ViTConfig
  classes: tuple[tuple[str, int], ...]
  pool: str = "attn"
  dense: tuple[tuple[str, int], ...] = ()

  @nn.compact
  def __call__(self, images):
    tokens = vit.ViT(self.config, name="trunk")(images)  # [B, L, D], final norm applied
    b, _, d = tokens.shape
    if self.pool == "mean":
      pooled = jnp.broadcast_to(tokens.mean(axis=1, keepdims=True), (b, len(self.classes), d))
    else:
      queries = self.param("queries", nn.initializers.normal(0.02), (1, len(self.classes), d))
      pooled = nn.MultiHeadDotProductAttention(num_heads=self.config.num_heads, name="pool")(
        jnp.broadcast_to(queries, (b, len(self.classes), d)), tokens)
    pooled = nn.LayerNorm(name="ln_head")(pooled)
    out = {t: nn.Dense(n, name=f"head_{t}")(pooled[:, i]) for i, (t, n) in enumerate(self.classes)}
    if self.dense:
      normed = nn.LayerNorm(name="ln_dense")(tokens)
      out.update({t: nn.Dense(n, name=f"head_{t}")(normed) for t, n in self.dense})
    return out


def num_classes(tasks=TASKS) -> dict[str, int]:
  names = {**{t: v[0] for t, v in probe.task_labels().items()}, **probe.patch_classes()}
  return {t: len(names[t]) for t in tasks}


def lr_schedule(lr: float, steps: int):
  """Linear warm-up over the first 5% of the steps, then cosine decay to 1% of the peak."""
  warmup = max(1, steps // 20)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.01)


def make_optimizer(learning_rate, weight_decay):
  """Global-norm clip at 1, then AdamW (b2 0.999), decaying the weight matrices only (mm1-train's rule,
  by name: not norms, biases, position tables or the heads' queries)."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, b1=0.9, b2=0.999, weight_decay=weight_decay,
                                 mask=optim._decay_mask))  # noqa: SLF001


def accuracy(predict, params, images, labels, chunk: int = 256, progress: bool = False) -> dict[str, float]:
  """Per task, the share of `images` whose predicted class is the label; one compiled shape. A per-patch
  task (labels [images, patches]) scores over all patches, and as "TASK/shown" over the patches a shape
  covers (label not "none", the last class), which the background's majority does not flatter."""
  correct = {t: 0 for t in labels}
  shown = {t: [0, 0] for t in labels if labels[t].ndim == 2}  # [right, patches] where a shape is shown
  none = {t: num_classes((t,))[t] - 1 for t in shown}
  for i in tqdm(range(0, len(images), chunk), desc="test", unit="batch", disable=not progress, leave=False):
    x = images[i:i + chunk]
    n = len(x)
    if n < chunk:
      x = np.concatenate([x, np.zeros((chunk - n,) + x.shape[1:], x.dtype)])
    pred = predict(params, jnp.asarray(x))
    for t in labels:
      right = np.asarray(pred[t])[:n] == labels[t][i:i + n]
      correct[t] += int(right.sum())
      if t in shown:
        mask = labels[t][i:i + n] != none[t]
        shown[t][0] += int(right[mask].sum())
        shown[t][1] += int(mask.sum())
  out = {t: correct[t] / labels[t].size for t in labels}
  out.update({f"{t}/shown": r / max(m, 1) for t, (r, m) in shown.items()})
  return out


def compile_steps(model: nn.Module, tx, image_size: int, preprocess=None):
  """(init, step, predict), jitted, for a model that maps uint8 images to {task: logits}:
    init(key) -> (params, opt state)
    step(params, opt, lr, key, images, labels) -> (params, opt, {task: mean cross-entropy}),
      training on the sum of the tasks' losses; `preprocess(key, images)` (an augmentation)
      runs first when given; `tx` is an `optax.inject_hyperparams` optimizer, lr its rate
    predict(params, images) -> {task: class index}
  """
  @jax.jit
  def init(key):
    params = nn.meta.unbox(model.init(key, jnp.zeros((2, image_size, image_size, 3), jnp.uint8))["params"])
    return params, tx.init(params)

  @jax.jit
  def step(params, opt, lr, key, images, labels):
    if preprocess is not None:
      images = preprocess(key, images)

    def loss_fn(p):
      logits = model.apply({"params": p}, images)
      losses = {t: optax.softmax_cross_entropy_with_integer_labels(logits[t], labels[t]).mean() for t in labels}
      return sum(losses.values()), losses

    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    opt.hyperparams["learning_rate"] = lr
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, losses

  predict = jax.jit(lambda p, x: {t: jnp.argmax(v, -1) for t, v in model.apply({"params": p}, x).items()})
  return init, step, predict


def train_encoder(encoder: vit.ViTConfig, config: SupervisedConfig = SupervisedConfig(), *,
                  progress: bool = True) -> tuple[dict, dict]:
  """Trains `encoder` with the heads on fresh labelled scenes; returns (trunk params, result)."""
  t_start = time.perf_counter()
  tasks = LABELS[config.labels]
  patch = encoder.patch_size if config.labels in PER_PATCH else None  # also a label per token
  dense = probe.PATCH_TASKS if patch else ()
  model = ViTClassifier(encoder, tuple(num_classes(tasks).items()), dense=tuple(num_classes(dense).items()))
  tx = optax.inject_hyperparams(make_optimizer)(learning_rate=0.0, weight_decay=config.weight_decay)
  schedule = lr_schedule(config.learning_rate, config.steps)
  size = encoder.image_size

  init, step, predict = compile_steps(model, tx, size)
  params, opt = init(jax.random.PRNGKey(config.seed))
  bs = config.batch_size

  def batch(k):
    return probe.scenes(STREAM, k * bs, bs, size, tasks, seed=config.seed, patch_size=patch)

  losses = []
  with concurrent.futures.ThreadPoolExecutor(1) as pool, \
       tqdm(total=config.steps, desc="supervised", unit="step", disable=not progress) as bar:
    nxt = pool.submit(batch, 0)  # scenes are drawn on the host one step ahead
    for k in range(config.steps):
      images, labels = nxt.result()
      if k + 1 < config.steps:
        nxt = pool.submit(batch, k + 1)
      params, opt, task_losses = step(params, opt, jnp.float32(schedule(k)), None, jnp.asarray(images),
                                      {t: jnp.asarray(v) for t, v in labels.items()})
      loss = sum(task_losses.values())
      if k >= config.steps - max(1, config.steps // 10):
        losses.append(loss)
      bar.update()
      if k % 50 == 0 or k + 1 == config.steps:
        bar.set_postfix(loss=f"{float(loss):.3f}")
  jax.block_until_ready(params)
  train_s = time.perf_counter() - t_start
  test = accuracy(predict, params, *probe.make_split("test", config.num_test, size, tasks, patch_size=patch),
                  progress=progress)
  chance = {t: 1 / n for t, n in num_classes(tasks + dense).items()}
  chance.update({f"{t}/shown": 1 / (num_classes((t,))[t] - 1) for t in dense})
  result = {"settings": dataclasses.asdict(config), "encoder": dataclasses.asdict(encoder),
            "test_accuracy": {t: round(v, 4) for t, v in test.items()},
            "chance": {t: round(v, 4) for t, v in chance.items()},
            "final_train_loss": round(float(np.mean([float(x) for x in losses])), 4),
            "train_s": round(train_s, 1), "seconds": round(time.perf_counter() - t_start, 1)}
  return params["trunk"], result


def _same_run(result: dict, config: SupervisedConfig, encoder: vit.ViTConfig) -> bool:
  want = json.loads(json.dumps({"settings": dataclasses.asdict(config), "encoder": dataclasses.asdict(encoder)}))
  # A result.json from before --labels existed was trained on the leftmost shape's labels.
  have = {**result, "settings": {"labels": "leftmost", **result.get("settings", {})}}
  return all(have.get(k) == v for k, v in want.items())


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  p = argparse.ArgumentParser(prog="mm1-supervised", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_cli.add_gin_flags(p, example="gin/experiments/quickstart.gin (MODEL's encoder is trained)")
  p.add_argument("--out", required=True, help="folder for params/ and result.json (the init_from entry)")
  d = SupervisedConfig()
  p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
  p.add_argument("--batch_size", type=int, default=d.batch_size, help=f"scenes a step (default {d.batch_size})")
  p.add_argument("--learning_rate", type=float, default=d.learning_rate,
                 help=f"peak learning rate (default {d.learning_rate})")
  p.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW's, on weight matrices")
  p.add_argument("--seed", type=int, default=d.seed, help="initialisation and the scenes drawn")
  p.add_argument("--num_test", type=int, default=d.num_test, help="held-out scenes scored (mm1-probe's test split)")
  p.add_argument("--labels", choices=sorted(LABELS), default=d.labels,
                 help="the shapes labelled: every one by its place, that and each patch's shape, or the "
                      f"leftmost only (default {d.labels})")
  p.add_argument("--overwrite", action="store_true",
                 help="retrain although OUT holds a trunk of other settings (or parameters of unknown origin)")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--json", action="store_true", help="print OUT/result.json's content as the last line")
  args = p.parse_args(rest)
  if min(args.steps, args.batch_size, args.num_test) < 1:
    p.error("--steps, --batch_size and --num_test must be positive")
  gin_cli.parse(args, bindings, read_by_command=("MODEL",))
  model_config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  encoder = getattr(model_config, "encoder", None)
  if not isinstance(encoder, vit.ViTConfig):
    print(f"mm1-supervised: MODEL's encoder is {type(encoder).__name__}, not a vit.ViTConfig", file=sys.stderr)
    return 2
  config = SupervisedConfig(args.steps, args.batch_size, args.learning_rate, args.weight_decay, args.seed,
                            args.num_test, args.labels)
  out = paths.path(args.out)
  done = out / "result.json"
  old = json.loads(done.read_text()) if done.exists() else None
  if (out / "params").exists() and old is not None and _same_run(old, config, encoder):
    print(f"mm1-supervised: {out} already holds this trunk; reusing it")
    return _report(old, out, args.json)
  if (out / "params").exists() and not args.overwrite:
    what = "a trunk of other settings or another encoder" if old else "parameters this command did not write"
    print(f"mm1-supervised: {out} holds {what}; --overwrite retrains, or choose another --out", file=sys.stderr)
    return 2
  if done.exists():
    done.unlink()  # OUT is complete again only when result.json is written, after the parameters
  trunk, result = train_encoder(encoder, config, progress=not args.no_progress)
  out.mkdir(parents=True, exist_ok=True)
  checkpoint.save_params({"encoder": trunk}, out / "params")
  paths.write_text_atomic(done, json.dumps(result, indent=1) + "\n")
  return _report(result, out, args.json)


def _report(result: dict, out, as_json: bool) -> int:
  acc = "  ".join(f"{t} {v:.3f} (chance {result['chance'][t]:.3f})" for t, v in result["test_accuracy"].items())
  print(f"held-out accuracy on {result['settings']['num_test']} scenes: {acc}")
  print(f"trunk in {out}/params ({result['seconds']:.0f} s to train): "
        f"train.train.init_from = [\"{out}:encoder\"] hands it to MM1")
  if as_json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("supervised"))
