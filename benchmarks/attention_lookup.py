"""Where the decoder looks when it answers a VQA question about one shape of several.

"what colour is the triangle?" names the shape by its kind, "what shape is the red object?"
by its colour. For every such question of the held-out split whose scene has two or more
shapes, the zero-shot prompt, built as mm1-eval builds it, runs through the model once. At
two query positions, the last token of the naming word ("triangle", "red") and the last
prompt position (the one that predicts the answer), this takes each decoder layer's and
head's attention weights on the image tokens and, of the weight on the cells that shapes
cover, the share on the cells of the shape asked about. Attention spread evenly over the
shapes' cells gives that share by chance (`chance`, the asked shape's cells over all shapes'
cells); a head that finds the asked shape puts more there.

  python -m benchmarks.attention_lookup --run=/tmp/mm1_sft/run [--run=...] \\
      [--json_out=benchmarks/results/attention_lookup/NAME.json]

Each --run is a finished run folder (its config.gin and checkpoints/), read at its newest
step or, as `--run=FOLDER@N`, at step N; the record holds beside each the run's own zero-shot
VQA accuracy at that step, where it evaluated then (`run_eval_at_step`, with the number of
questions that evaluation asked: a pre-training run's own may ask a subset). The prompt format is
the run's own evaluation's (the chat template after SFT). The image tokens are the connector's
pooled grid in row-major order (the C-Abstractor's and average pooling's, side x side over the
image); a cell belongs to the shape that covers most of its pixels if
that is at least MIN_CELL_PIXELS of them. Questions whose shape owns no cell (a small shape
split over four cells), whose other shapes own none, or whose naming word does not end a
token of the prompt, are counted and left out. Dense decoders only (a sparse one's grouped
stacks are not read in layer order).

`after_named` gives the same share for every position after the naming word through the answer
position (the question mark, the prompt's answer cue, a chat template's turn tokens), and the
best head and position of all: a kind-keyed lookup made between the two would show there. The
best of many heads and positions is a maximum, above chance even where no head looks, so
`after_named_decoy` gives the same for a decoy: another shape of the same scene, drawn at random
per question, that nothing in the prompt names. Its best excess over its own chance is what the
maximum reaches without a lookup (a head drawn to large or bright shapes, say); a head that finds
the asked shape shows as an asked-shape excess well above the decoy's.

What it leaves out: attention weight is not use (the value vectors and the later layers decide
what is read); heads are reported each and averaged; one prompt format, zero-shot.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from benchmarks import record, vqa_breakdown
from benchmarks.jobs import record_header, write_record

MIN_CELL_PIXELS = 16
DECOY_SEED = 4021  # draws each question's decoy shape (after_named_decoy)
# Query positions: the last token of the word that names the shape ("triangle", "red") and the
# last prompt position, which predicts the answer.
POSITIONS = ("named", "answer")
# Question type: its pattern, whose group is the naming word (vqa_breakdown's).
TYPES = {"colour": vqa_breakdown._COLOUR_Q, "shape": vqa_breakdown._SHAPE_Q}


def cell_owners(shapes, image_size: int, side: int) -> np.ndarray:
  """int[side * side], row-major: per cell of the pooled grid the index in `shapes` of the shape
  covering most of its pixels (at least MIN_CELL_PIXELS), else -1."""
  from mm1_jax.data import shapes_world as sw  # noqa: PLC0415

  own = sw.owners(shapes, image_size)
  edges = np.linspace(0, image_size, side + 1).round().astype(int)
  out = np.full(side * side, -1, np.int64)
  for r in range(side):
    for c in range(side):
      cell = own[edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
      counts = np.bincount(cell.ravel(), minlength=len(shapes) + 1)[1:]
      if counts.size and counts.max() >= MIN_CELL_PIXELS:
        out[r * side + c] = int(counts.argmax())
  return out


def asked_index(question: str, shapes) -> tuple[str, int] | None:
  """(question type, index in `shapes` of the shape asked about), None for other questions."""
  for kind, pattern in TYPES.items():
    m = pattern.fullmatch(question)
    if m:
      field = "kind" if kind == "colour" else "colour"
      match = [i for i, s in enumerate(shapes) if getattr(s, field) == m.group(1)]
      return (kind, match[0]) if len(match) == 1 else None
  return None


def decoy_index(owners: np.ndarray, asked: int, rng: np.random.Generator) -> int:
  """A shape other than the asked one that owns cells, drawn uniformly (the null's shape)."""
  others = np.unique(owners[(owners >= 0) & (owners != asked)])
  return int(rng.choice(others))


def lookup_share(weights: np.ndarray, owners: np.ndarray, asked: int) -> tuple[np.ndarray, float]:
  """weights float[..., cells] on the image tokens -> (share of the weight on shape cells that is on
  the asked shape's cells, float[...]; the share by chance, uniform over the shapes' cells)."""
  on_shapes = owners >= 0
  mine = owners == asked
  total = (weights * on_shapes).sum(-1)
  return (weights * mine).sum(-1) / np.maximum(total, 1e-30), mine.sum() / on_shapes.sum()


def decoder_sown(state, name: str = "probs") -> list[np.ndarray]:
  """What every decoder `Attention` sowed under `name` ("probs": the softmax weights, each
  float[B, K, G, T, S]; "keys", "inputs": `layers.PROBS_COLLECTION`), in layer order (a scanned
  stack's [layers, B, ...] split into its layers)."""
  import jax  # noqa: PLC0415

  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if "decoder" in names and name in names:
      found.append((names, np.asarray(leaf)))
  natural = lambda names: [int(t) if t.isdigit() else t for n in names for t in re.split(r"(\d+)", n)]  # noqa: E731
  out = []
  for names, leaf in sorted(found, key=lambda f: natural(f[0])):
    out += list(leaf) if "layers" in names else [leaf]  # "layers": the scanned stack's submodule
  return out


def _rounded(a: np.ndarray) -> list:
  return np.round(np.asarray(a, np.float64), 4).tolist()


@dataclasses.dataclass
class LoadedRun:
  """A finished run's model, parameters at one step and zero-shot VQA evaluator (`load_run`)."""
  config: object  # MM1Config
  model: object  # MM1
  params: object
  step: int
  mesh: object
  rules: object
  evaluator: object  # fewshot.Evaluator, shapes_vqa at 0 shots with the run's prompt format
  bench: object  # the evaluator's shapes_vqa benchmark
  side: int  # the pooled grid's side: tokens_per_image = side * side
  sown: object  # (tokens, images, valid) -> what the prefill sowed (`layers.PROBS_COLLECTION`), jitted
  own_num_queries: int | None  # the run's own evaluation's queries per benchmark (None: the whole split)


def load_run(run: Path, step: int | None = None) -> LoadedRun:
  """Loads the run's config.gin and its checkpoint at `step` (default the newest; dense decoders
  with a pooled-grid connector)."""
  import flax.linen as nn  # noqa: PLC0415
  import gin  # noqa: PLC0415
  import jax  # noqa: PLC0415

  import tasks  # noqa: F401, PLC0415  (registers the shapes-world seqio tasks)
  from mm1_jax import connector, gin_files, layers  # noqa: PLC0415
  from mm1_jax import decoder as decoder_lib  # noqa: PLC0415
  from mm1_jax import sharding as sharding_lib  # noqa: PLC0415
  from mm1_jax.checkpoint import Checkpointer  # noqa: PLC0415
  from mm1_jax.eval import fewshot  # noqa: PLC0415
  from mm1_jax.model import MM1  # noqa: PLC0415
  from mm1_jax.train import dummy_batch, init_param_shardings  # noqa: PLC0415

  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(gin_files.root()))
  gin.parse_config_files_and_bindings([str(run / "config.gin")], [])
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  evaluation = gin.query_parameter("%EVALUATION").scoped_configurable_fn()
  mesh_cfg = gin.query_parameter("%MESH").scoped_configurable_fn()
  gin.clear_config(clear_constants=True)
  if config.decoder.moe is not None:
    raise SystemExit(f"{run}: a sparse decoder's grouped stacks are not read in layer order here")
  if not isinstance(config.connector, (connector.CAbstractorConfig, connector.AvgPoolConfig)):
    raise SystemExit(f"{run}: the image tokens of a {type(config.connector).__name__} are not a pooled grid")
  own_num_queries = evaluation.num_queries
  evaluation = dataclasses.replace(evaluation, benchmarks=("shapes_vqa",), shots=(0,), train_mixture=None,
                                   num_queries=None)
  mm1 = MM1(config)
  mesh = sharding_lib.make_mesh(mesh_cfg)
  abstract, shardings = init_param_shardings(mm1, dummy_batch(1, 8, 1, config), mesh, mesh_cfg.rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  ckpt = Checkpointer(run / "checkpoints")
  steps = ckpt.all_steps()
  if step is None:
    step = steps[-1]
  elif step not in steps:
    ckpt.close()
    raise SystemExit(f"{run}: no checkpoint at step {step} (it has {', '.join(map(str, steps))})")
  params = ckpt.restore_params(step, target)
  ckpt.close()
  ev = fewshot.Evaluator(evaluation, mm1, mesh, mesh_cfg.rules)

  @jax.jit
  def forward(params, tokens, images, valid):
    cache = decoder_lib.init_cache(config.decoder, tokens.shape[0], tokens.shape[1])
    _, state = mm1.apply({"params": params}, tokens, images, valid, cache, method=MM1.prefill,
                         mutable=[layers.PROBS_COLLECTION])
    return state

  def sown(tokens, images, valid):
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_cfg.rules):
      return forward(params, tokens, images, valid)

  return LoadedRun(config=config, model=mm1, params=params, step=step, mesh=mesh, rules=mesh_cfg.rules,
                   evaluator=ev, bench=ev.benchmarks["shapes_vqa"],
                   side=int(round(config.tokens_per_image ** 0.5)), sown=sown,
                   own_num_queries=own_num_queries)


def analyse(run: Path, progress: bool = True, step: int | None = None) -> dict:
  """Loads the run's checkpoint at `step` (default the newest) and measures every colour and shape
  question (module docstring)."""
  from tqdm import tqdm  # noqa: PLC0415

  from mm1_jax.data import corpus  # noqa: PLC0415
  from mm1_jax.eval import fewshot  # noqa: PLC0415

  loaded = load_run(run, step)
  config, ev, bench, side = loaded.config, loaded.evaluator, loaded.bench, loaded.side
  evaluation = ev.config
  shares: dict[tuple[str, str], list] = {(k, at): [] for k in TYPES for at in POSITIONS}
  chances: dict[str, list] = {k: [] for k in TYPES}
  after: dict[str, list] = {k: [] for k in TYPES}  # every position after the naming word
  decoy: dict[str, list] = {k: [] for k in TYPES}  # the same, on another shape of the scene
  after_chances: dict[str, list] = {k: [] for k in TYPES}
  decoy_chances: dict[str, list] = {k: [] for k in TYPES}
  skipped = {"one_shape": 0, "no_cell": 0, "no_other_cell": 0, "word_not_a_token_prefix": 0}
  seed, size = corpus.CorpusSpec().seed, config.encoder.image_size
  rng = np.random.default_rng(DECOY_SEED)
  for q in tqdm(bench.test, desc="questions", unit="q", disable=not progress):
    shapes = vqa_breakdown.scene_of(q["id"], q["question"], seed, size)
    found = asked_index(q["question"], shapes)
    if found is None:
      continue
    kind, asked = found
    if len(shapes) < 2:
      skipped["one_shape"] += 1
      continue
    owners = cell_owners(shapes, size, side)
    if not (owners == asked).any():
      skipped["no_cell"] += 1
      continue
    if not ((owners >= 0) & (owners != asked)).any():  # the share would be 1 whatever the weights
      skipped["no_other_cell"] += 1
      continue
    prompt = fewshot.build_prompt(bench.template, [], q, evaluation.chat_template)
    tokens = ev._encode(prompt)
    word = TYPES[kind].fullmatch(q["question"]).group(1)
    upto = ev._encode(prompt[:prompt.rindex(word) + len(word)])  # through the naming word
    if not np.array_equal(upto, tokens[:len(upto)]):
      skipped["word_not_a_token_prefix"] += 1
      continue
    image = ev.images(q)
    state = loaded.sown(tokens[None], image[None, None], np.ones((1, len(tokens)), bool))
    at_image = np.flatnonzero(tokens == ev.ids.image)
    assert len(at_image) == config.tokens_per_image, (q["id"], len(at_image))
    layer_probs = decoder_sown(state)  # each [1, K, G, T, S]
    for at, row in (("named", len(upto) - 1), ("answer", len(tokens) - 1)):
      probs = np.stack([p[0, :, :, row].reshape(-1, p.shape[-1])[:, at_image] for p in layer_probs])
      share, chance = lookup_share(probs, owners, asked)  # [layers, heads]
      shares[(kind, at)].append(share)
    if len(upto) < len(tokens):
      later = np.stack([np.stack([p[0, :, :, row].reshape(-1, p.shape[-1])[:, at_image] for p in layer_probs])
                        for row in range(len(upto), len(tokens))])  # [positions, layers, heads, cells]
      after[kind].append(lookup_share(later, owners, asked)[0])  # [positions, layers, heads]
      after_chances[kind].append(chance)
      other_share, other_chance = lookup_share(later, owners, decoy_index(owners, asked, rng))
      decoy[kind].append(other_share)
      decoy_chances[kind].append(other_chance)
    chances[kind].append(chance)
  out = {"run": str(run), "step": loaded.step, "cells": side * side, "skipped": skipped,
         "run_eval_at_step": run_eval(run, loaded.step, loaded.own_num_queries)}
  for kind in TYPES:
    out[kind] = {"questions": len(chances[kind]), "chance": round(float(np.mean(chances[kind])), 4)}
    for at in POSITIONS:
      v = np.stack(shares[(kind, at)])  # [questions, layers, heads]
      excess = v - np.asarray(chances[kind])[:, None, None]  # over each question's own chance
      out[kind][at] = {
          "share_mean_of_heads": _rounded(v.mean((0, 2))),
          "share_by_head": _rounded(v.mean(0)),
          "share_se_by_head": _rounded(v.std(0, ddof=1) / np.sqrt(len(v))),
          "excess_over_chance_by_head": _rounded(excess.mean(0)),
          "excess_se_by_head": _rounded(excess.std(0, ddof=1) / np.sqrt(len(v))),
      }
    out[kind]["after_named"] = after_named_summary(after[kind], after_chances[kind])
    out[kind]["after_named_decoy"] = after_named_summary(decoy[kind], decoy_chances[kind])
  return out


def after_named_summary(shares: list[np.ndarray], chances: list[float] | None = None) -> dict | None:
  """Per question float[positions, layers, heads], the shares at the positions after the naming
  word through the answer -> their mean over questions, the positions counted back from the answer
  (questions may differ in length after the word; the shortest sets how many are compared), and
  the best head and position (`from_answer`: 0 is the answer position). With each question's
  chance, also the best mean excess over it (`best_excess`). None without positions."""
  n = min((len(a) for a in shares), default=0)
  if n == 0:
    return None
  stacked = np.stack([a[len(a) - n:] for a in shares])  # [questions, positions, layers, heads]
  v = stacked.mean(0)

  def at(best, value: dict) -> dict:
    return {"from_answer": int(n - 1 - best[0]), "layer": int(best[1]), "head": int(best[2]), **value}

  best = np.unravel_index(int(v.argmax()), v.shape)
  out = {"positions": n, "share_by_position_and_head": _rounded(v),
         "best": at(best, {"share": round(float(v[best]), 4)})}
  if chances is not None:
    excess = stacked - np.asarray(chances, np.float64)[:, None, None, None]
    e = excess.mean(0)
    top = np.unravel_index(int(e.argmax()), e.shape)
    at_top = excess[(slice(None), *top)]  # [questions]
    se = round(float(at_top.std(ddof=1) / np.sqrt(len(at_top))), 4) if len(at_top) > 1 else None
    out["best_excess"] = at(top, {"excess": round(float(e[top]), 4), "se": se})
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", required=True,
                 help="a finished run folder, FOLDER@STEP for a step other than its newest (repeatable)")
  p.add_argument("--json_out", default=None, help="the record, e.g. benchmarks/results/attention_lookup/NAME.json")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)

  def report(name: str, r: dict) -> None:
    for kind in TYPES:
      for at in POSITIONS:
        print(f"{name} {kind} at the {at} position: {r[kind]['questions']} questions, chance "
              f"{r[kind]['chance']}, share on the asked shape by layer {r[kind][at]['share_mean_of_heads']}")
      best = (r[kind]["after_named"] or {}).get("best")
      print(f"{name} {kind}, best head at any position after the naming word: {best}")
      for key, what in (("after_named", "the asked shape"), ("after_named_decoy", "a decoy shape")):
        print(f"{name} {kind}, best excess over chance on {what}: {(r[kind][key] or {}).get('best_excess')}")

  return analyse_runs(p, args.run, lambda path, step: analyse(path, progress=not args.no_progress, step=step), report,
                      args.json_out, "attention_lookup")


def run_eval(run: Path, step: int, num_queries: int | None = None) -> dict | None:
  """The run's own zero-shot VQA accuracy (overall and per answer type) from its evaluation at
  `step` (eval/step_<step>.json, as mm1-train writes it), None where it made none then.
  `num_queries`: the questions that evaluation asked (its config's; None: the whole split)."""
  import json  # noqa: PLC0415

  path = run / "eval" / f"step_{step}.json"
  if not path.exists():
    return None
  prefix = "shapes_vqa/0shot/accuracy"  # mm1-train's flat keys: ".../accuracy", ".../accuracy/colour", ...
  results = json.loads(path.read_text()).get("results", {})
  acc = {(k[len(prefix) + 1:] or "all"): v for k, v in results.items() if k == prefix or k.startswith(prefix + "/")}
  if not acc:
    return None
  return {"shapes_vqa_0shot_accuracy": acc, "num_queries": num_queries or "all", "source": str(path)}


def parse_run(spec: str) -> tuple[Path, int | None]:
  """--run's value: FOLDER (its newest step) or FOLDER@STEP."""
  folder, at, step = spec.rstrip("/").rpartition("@")
  if at and step.isdigit():
    return Path(folder), int(step)
  return Path(spec), None


def analyse_runs(parser: argparse.ArgumentParser, runs: list[str], analyse_one, report, json_out: str | None,
                 benchmark: str) -> int:
  """Runs `analyse_one(path, step)` on each --run (a finished run folder, FOLDER@STEP for a step
  other than the newest), prints each result with `report(name, result)` and writes them all as
  one record of `benchmark` to `json_out`, keyed by the folder's name (with @STEP when given)."""
  git = record.git_state()  # the code this run loads
  result = {**record_header(), "runs": {}}
  parsed = [(spec, *parse_run(spec)) for spec in runs]
  for spec, path, step in parsed:  # every --run checked before any is read
    if not (path / "config.gin").exists() or not (path / "checkpoints").exists():
      parser.error(f"--run={spec}: no config.gin and checkpoints/ there")
    if step is not None and not (path / "checkpoints" / str(step)).is_dir():
      parser.error(f"--run={spec}: no checkpoint at step {step} in {path / 'checkpoints'}")
  for spec, path, step in parsed:
    name = path.name if step is None else f"{path.name}@{step}"
    result["runs"][name] = analyse_one(path, step)
    report(name, result["runs"][name])
  if json_out:
    write_record(Path(json_out), result, git=git, benchmark=benchmark)
  return 0


if __name__ == "__main__":
  sys.exit(main())
