"""Can a query find a shape by its kind? Linear probes on the decoder's image tokens and keys.

A head that answers "what colour is the triangle?" must give the image cells of the triangle
higher scores q . k than the other shapes' cells, with one query vector q for every cell. So
whether ANY query could find a shape by its kind, in a given layer and head, is whether one
linear map of that head's keys tells the cells' kinds apart: a linear probe on the keys. This
fits such probes (multinomial logistic regression, one weight vector per class, as the query is
one vector per question) on the image cells of fresh shapes-world scenes:

- `inputs`: each decoder layer's attention input (the block's normed residual stream) at the
  image cells; layer 0's is the connector's output as the decoder sees it;
- `keys`: each layer's keys, per key head, after RoPE (as the queries meet them).

Labels: a cell's kind and colour are those of the shape covering most of its pixels (at least
attention_lookup.MIN_CELL_PIXELS); cells of the background are left out. Scenes are drawn from
their own random stream (none is a training or evaluation scene), rendered as the corpus renders
them, and each goes through the model in the run's zero-shot VQA prompt (images come first, so
under causal attention the image cells do not depend on the question). The first `--train`
scenes fit the probes, the rest test them; `majority` is the test accuracy of always answering
the training cells' most common class.

  python -m benchmarks.token_probe --run=/tmp/mm1_sft/run [--run=...] \\
      [--json_out=benchmarks/results/token_probe/NAME.json]

What it leaves out: a probe says what a linear readout could find, not what the model reads; a
cell holds a fragment of a shape (16 x 16 px of a 64 px scene on MM1-tiny's 4 x 4 grid), so the
kind of one cell may be undecidable from that cell alone; cells of one scene are not independent
(the standard errors treat them as if they were). A probe standardises the features, so it
finds a class however little of the vectors' variance it holds; `variance_share` (the share of the
raw features' variance between the class means, on the training cells) says how much that is,
for a query's dot product sees the raw vectors. Dense decoders only.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from benchmarks import attention_lookup

STREAM_SEED = 9173  # the probe's own scene stream: not a corpus seed
ATTRIBUTES = ("kind", "colour")


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              num_classes: int, l2: float = 1e-3, steps: int = 400) -> dict:
  """Multinomial logistic regression on standardised features (full-batch Adam); test accuracy,
  its standard error over cells, and the majority-class accuracy on the same test cells."""
  import jax.numpy as jnp  # noqa: PLC0415

  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  xt, xs = (x_train - mean) / std, (x_test - mean) / std
  w, b = _fitter()(jnp.asarray(xt, jnp.float32), jnp.asarray(y_train), num_classes=num_classes, l2=l2,
                   steps=steps)
  pred = np.asarray(jnp.argmax(jnp.asarray(xs, jnp.float32) @ w + b, -1))
  acc = float((pred == y_test).mean())
  majority = int(np.bincount(y_train, minlength=num_classes).argmax())
  return {"accuracy": round(acc, 4), "se": round(float(np.sqrt(acc * (1 - acc) / len(y_test))), 4),
          "majority": round(float((y_test == majority).mean()), 4),
          "variance_share": round(variance_share(x_train, y_train), 4)}


@functools.lru_cache(maxsize=None)
def _fitter():
  """The probe's fit as one compiled program, `steps` full-batch Adam steps inside it: compiled
  once per shape of the training features and class count (a run's probes share the cells, so
  once per feature width) rather than once per probe, with no dispatch per step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  def fit(x, y, num_classes, l2, steps):
    opt = optax.adam(0.05)

    def loss(p):
      logits = x @ p["w"] + p["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * (p["w"] ** 2).sum()

    def step(_, carry):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
    return params["w"], params["b"]

  return jax.jit(fit, static_argnames=("num_classes", "steps"))


def variance_share(x: np.ndarray, y: np.ndarray) -> float:
  """The share of the features' total variance (raw, not standardised) that lies between the
  class means: how much of what a dot product with these vectors sees varies with the class."""
  mu = x.mean(0)
  total = ((x - mu) ** 2).sum(-1).mean()
  between = sum((y == c).mean() * ((x[y == c].mean(0) - mu) ** 2).sum() for c in np.unique(y))
  return float(between / max(total, 1e-30))


def cell_labels(shapes, image_size: int, side: int) -> dict[str, np.ndarray]:
  """{"kind": int[cells], "colour": int[cells]}: the class index of the shape owning each cell
  of the pooled grid (row-major), -1 for background cells."""
  from mm1_jax.data import shapes_world as sw  # noqa: PLC0415

  owners = attention_lookup.cell_owners(shapes, image_size, side)
  names = {"kind": list(sw.SHAPES), "colour": list(sw.COLOURS)}
  return {a: np.array([names[a].index(getattr(shapes[o], a)) if o >= 0 else -1 for o in owners])
          for a in ATTRIBUTES}


def analyse(run: Path, scenes: int, train: int, batch: int = 16, progress: bool = True,
            step: int | None = None) -> dict:
  """Loads the run's checkpoint at `step` (default the newest) and probes every layer's inputs and
  keys (module docstring)."""
  from tqdm import tqdm  # noqa: PLC0415

  from mm1_jax.data import shapes_world as sw  # noqa: PLC0415
  from mm1_jax.eval import fewshot  # noqa: PLC0415

  loaded = attention_lookup.load_run(run, step)
  config, ev = loaded.config, loaded.evaluator
  size = config.encoder.image_size
  q = loaded.bench.test[0]
  tokens = ev._encode(fewshot.build_prompt(loaded.bench.template, [], q, ev.config.chat_template))
  at_image = np.flatnonzero(tokens == ev.ids.image)
  if len(at_image) != config.tokens_per_image:
    raise SystemExit(f"{run}: the prompt holds {len(at_image)} image tokens, not one image's "
                     f"{config.tokens_per_image}")
  feats: dict[str, list] = {"inputs": [], "keys": []}
  labels: dict[str, list] = {a: [] for a in ATTRIBUTES}
  for start in tqdm(range(0, scenes, batch), desc="scenes", unit="batch", disable=not progress):
    idx = range(start, min(start + batch, scenes))
    drawn = []
    for i in idx:
      rng = np.random.default_rng([STREAM_SEED, i])
      shapes = sw.sample_scene(rng, size)
      drawn.append((shapes, sw.render(shapes, rng, size)))
    images = np.stack([image for _, image in drawn])[:, None]
    toks = np.repeat(tokens[None], len(drawn), 0)
    state = loaded.sown(toks, images, np.ones(toks.shape, bool))
    for name in feats:
      per_layer = attention_lookup.decoder_sown(state, name)  # each [B, T, D] or [B, T, K, H]
      feats[name].append(np.stack([a[:, at_image] for a in per_layer], 1).astype(np.float32))  # [B, layers, cells, ...]
    for shapes, _ in drawn:
      for a, v in cell_labels(shapes, size, loaded.side).items():
        labels[a].append(v)
  x = {name: np.concatenate(v) for name, v in feats.items()}  # [scenes, layers, cells, ...]
  y = {a: np.stack(v) for a, v in labels.items()}  # [scenes, cells]
  owned = y["kind"] >= 0
  split = np.arange(scenes) < train
  tr, te = owned & split[:, None], owned & ~split[:, None]
  classes = {"kind": len(sw.SHAPES), "colour": len(sw.COLOURS)}
  layers_n = x["inputs"].shape[1]
  out = {"run": str(run), "step": loaded.step, "cells": loaded.side ** 2, "scenes": scenes, "train_scenes": train,
         "train_cells": int(tr.sum()), "test_cells": int(te.sum())}
  for a in ATTRIBUTES:
    res = {"inputs": [], "keys": []}
    for layer in range(layers_n):
      xi = x["inputs"][:, layer]  # [scenes, cells, D]
      res["inputs"].append(fit_probe(xi[tr], y[a][tr], xi[te], y[a][te], classes[a]))
      xk = x["keys"][:, layer]  # [scenes, cells, K, H]
      res["keys"].append([fit_probe(xk[..., h, :][tr], y[a][tr], xk[..., h, :][te], y[a][te], classes[a])
                          for h in range(xk.shape[2])])
    out[a] = res
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", required=True,
                 help="a finished run folder, FOLDER@STEP for a step other than its newest (repeatable)")
  p.add_argument("--scenes", type=int, default=600, help="scenes drawn (default 600)")
  p.add_argument("--train", type=int, default=400, help="of which the first N fit the probes (default 400)")
  p.add_argument("--json_out", default=None, help="the record, e.g. benchmarks/results/token_probe/NAME.json")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)
  if not 0 < args.train < args.scenes:
    p.error(f"--train={args.train} must be between 0 and --scenes={args.scenes}, exclusive")

  def report(name: str, r: dict) -> None:
    for a in ATTRIBUTES:
      best_keys = [max(h["accuracy"] for h in layer) for layer in r[a]["keys"]]
      print(f"{name} {a} ({r['test_cells']} test cells, majority {r[a]['inputs'][0]['majority']}): "
            f"inputs by layer {[l['accuracy'] for l in r[a]['inputs']]}, best key head by layer {best_keys}")

  return attention_lookup.analyse_runs(
      p, args.run, lambda path, step: analyse(path, args.scenes, args.train, progress=not args.no_progress,
                                       step=step), report,
      args.json_out, "token_probe")

if __name__ == "__main__":
  sys.exit(main())
