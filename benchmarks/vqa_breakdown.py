"""Where do the VQA answers go wrong? Every zero-shot answer of a run on the shapes-world
test split, broken down by what the question points at.

  python -m benchmarks.vqa_breakdown --run=/tmp/mm1_lessons/lesson-base/seed0
  python -m benchmarks.vqa_breakdown --run=A --run=B --json_out=benchmarks/results/vqa_breakdown/x.json

For each run, `mm1-eval` scores its newest checkpoint on every test question of
`shapes_vqa` (0-shot) and keeps every prediction (`fewshot.FewShotConfig.num_samples =
None`), into <out>/<run's parent folder>/<run's folder>/ (evaluated afresh each time), so
the run's own eval/ folder is left alone. Each test
question's scene is then drawn again from the world's generator (its id names the scene;
the regenerated question must equal the stored one, or the script stops), and the answers
are grouped:

  colour, shape questions   by where the object asked about stands in the scene, left to
                            right (0 = leftmost), and by the scene's number of shapes; each
                            wrong answer also by what it names ("misses"): the colour or kind
                            of another shape in the scene (the right kind of fact about the
                            wrong shape), one that no shape in the scene has, or no colour or
                            kind at all; and those that name another shape's, by the places
                            of the shape asked about and of the shapes named ("misses_by_place"),
                            and whether they name the nearest shape (of those that could make
                            the answer wrong) to the one asked about, against how many would by
                            chance ("misses_nearest")
  number questions          by the true count and by the scene's number of shapes

With --probe, `mm1-probe` also probes each run's trunk (its newest checkpoint) on the kind
and colour of every shape by its place and the count (`mm1_jax.probe`'s tasks; the place
tasks also on the scenes that hold that place), and --probe_encoder=DIR the trunk a run
started from (an `mm1-supervised` --out): whether a shape the answers miss is in the trunk's
features at all, before and after MM1 pre-training, or is lost between the trunk and the
answer. Each cell has its count and accuracy; the standard error of a share p over n
questions is sqrt(p (1 - p) / n).

  python -m benchmarks.vqa_breakdown --run=/tmp/mm1_quickstart --probe \
      --probe_encoder=/tmp/mm1_quickstart_encoder --json_out=...
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import shutil
import sys
from pathlib import Path

from benchmarks import record
from benchmarks.jobs import newest_eval, record_header, run_logged, write_record
from mm1_jax import probe as probe_tasks

DEFAULT_OUT = Path("/tmp/mm1_vqa_breakdown")
_COLOUR_Q = re.compile(r"what colour is the (\w+)\?")
_SHAPE_Q = re.compile(r"what shape is the (\w+) object\?")
_NUMBER_Q = re.compile(r"how many (\w+)s are there\?")


def scene_of(sample_id: str, question: str, seed: int, image_size: int):
  """The shapes (left to right) of the test question `sample_id` ("vqa_eval-<index>"),
  drawn again as the corpus writer drew them; stops when the question does not match."""
  from mm1_jax.data import shapes_world as sw  # noqa: PLC0415

  stream, index = sample_id.rsplit("-", 1)
  ex = sw.vqa_example(seed, int(index), image_size, stream=stream)  # what the corpus writer wrote
  if ex["question"] != question:
    raise SystemExit(f"{sample_id}: the world draws {ex['question']!r}, the eval asked {question!r}: "
                     "another corpus seed or image size")
  return ex["shapes"]


def _attribute(question: str) -> str | None:
  """The `Shape` field a question's answer names: "colour" or "kind"; None for a number question."""
  if _COLOUR_Q.fullmatch(question):
    return "colour"
  return "kind" if _SHAPE_Q.fullmatch(question) else None


def asked_about(question: str, shapes) -> int | None:
  """The place (0 = leftmost) of the shape a colour or shape question asks about (the world asks
  by an attribute only one shape in the scene has); None for any other question."""
  if m := _COLOUR_Q.fullmatch(question):
    return next(i for i, s in enumerate(shapes) if s.kind == m.group(1))
  if m := _SHAPE_Q.fullmatch(question):
    return next(i for i, s in enumerate(shapes) if s.colour == m.group(1))
  return None


def groups(question: str, shapes) -> dict[str, str]:
  """The cells a question falls in: {grouping: value}."""
  out = {"shapes_in_scene": str(len(shapes))}
  if (asked := asked_about(question, shapes)) is not None:
    out["position"] = str(asked)
  elif m := _NUMBER_Q.fullmatch(question):
    out["true_count"] = str(sum(s.kind == m.group(1) for s in shapes))
  else:
    raise SystemExit(f"not a shapes-world question: {question!r}")
  return out


def miss(question: str, prediction: str, shapes) -> str | None:
  """What a wrong answer to a colour or shape question names, the answer taken whole (after VQA
  normalisation): "another_shape" (the colour or kind of a shape in the scene other than the
  one asked about), "not_in_scene" (a colour or kind no shape in the scene has),
  "no_attribute" (anything else, "red triangle" included); None for a number question or a
  right answer (one that another shape shares with the shape asked about included)."""
  from mm1_jax.data import shapes_world as sw  # noqa: PLC0415
  from mm1_jax.eval import metrics  # noqa: PLC0415

  asked = asked_about(question, shapes)
  if asked is None:
    return None
  attribute = _attribute(question)
  values = [getattr(s, attribute) for s in shapes]
  vocabulary = set(sw.COLOURS) if attribute == "colour" else set(sw.SHAPES)
  answer = metrics.normalize_answer(prediction)
  if answer == values[asked]:
    return None
  if answer in values:  # the right answer returned above, so another shape's
    return "another_shape"
  return "not_in_scene" if answer in vocabulary else "no_attribute"


def named_places(question: str, prediction: str, shapes) -> str | None:
  """For a wrong answer that names another shape's colour or kind ("another_shape" in `miss`):
  "<asked>-><named>", the place of the shape asked about and the places (left to right, joined
  by "+") of the other shapes that have the named colour or kind; None for any other answer."""
  from mm1_jax.eval import metrics  # noqa: PLC0415

  if miss(question, prediction, shapes) != "another_shape":
    return None
  attribute = _attribute(question)
  answer = metrics.normalize_answer(prediction)
  named = [str(i) for i, s in enumerate(shapes) if getattr(s, attribute) == answer]
  return f"{asked_about(question, shapes)}->{'+'.join(named)}"


def names_the_nearest(question: str, prediction: str, shapes) -> tuple[bool, float] | None:
  """For a wrong answer that names another shape's colour or kind: (whether it is that of the
  nearest shape, centre to centre, to the one asked about; the chance of that if the answer named
  a shape drawn at random), None for any other answer. Only the shapes whose colour (or kind)
  differs from the asked one's can make a wrong answer, so nearest and chance are over those."""
  from mm1_jax.eval import metrics  # noqa: PLC0415

  if miss(question, prediction, shapes) != "another_shape":
    return None
  attribute = _attribute(question)
  asked = shapes[asked_about(question, shapes)]
  others = [s for s in shapes if getattr(s, attribute) != getattr(asked, attribute)]
  nearest = min(others, key=lambda s: math.hypot(s.x - asked.x, s.y - asked.y))
  value = getattr(nearest, attribute)
  chance = sum(getattr(s, attribute) == value for s in others) / len(others)
  return value == metrics.normalize_answer(prediction), chance


def tabulate(samples: list[dict], seed: int, image_size: int) -> dict:
  """{answer_type: {grouping: {value: {"n", "accuracy", "se"}}}} over every sample; for
  colour and shape also "misses": {what the wrong answers name: how many} (`miss`), and
  "misses_by_place": {"<asked>-><named>": how many} for those that name another shape's
  (`named_places`), and "misses_nearest": how many of those name the shape nearest to the one
  asked about, how many would by chance, and the standard deviation of that chance count (each
  answer an independent draw; `names_the_nearest`)."""
  from mm1_jax.eval import metrics  # noqa: PLC0415

  scores: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
  misses: dict = collections.defaultdict(collections.Counter)
  misses_by_place: dict = collections.defaultdict(collections.Counter)
  nearest: dict = collections.defaultdict(list)
  for s in samples:
    shapes = scene_of(s["id"], s["question"], seed, image_size)
    acc = metrics.vqa_accuracy(s["prediction"], s["targets"])
    for grouping, value in {"all": "all", **groups(s["question"], shapes)}.items():
      scores[s["answer_type"]][grouping][value].append(acc)
    kind = miss(s["question"], s["prediction"], shapes)
    if kind:
      misses[s["answer_type"]][kind] += 1
    if kind == "another_shape":
      misses_by_place[s["answer_type"]][named_places(s["question"], s["prediction"], shapes)] += 1
      nearest[s["answer_type"]].append(names_the_nearest(s["question"], s["prediction"], shapes))
  out = {}
  for qtype, by in sorted(scores.items()):
    out[qtype] = ({"misses": dict(sorted(misses[qtype].items())),
                   "misses_by_place": dict(sorted(misses_by_place[qtype].items())),
                   "misses_nearest": {"another_shape": len(nearest[qtype]),
                                      "names_the_nearest": sum(hit for hit, _ in nearest[qtype]),
                                      "expected_by_chance": round(sum(c for _, c in nearest[qtype]), 2),
                                      "chance_sd": round(math.sqrt(sum(c * (1 - c) for _, c in nearest[qtype])), 2)}}
                  if qtype in ("colour", "shape") else {})
    for grouping, cells in by.items():
      out[qtype][grouping] = {}
      for value in sorted(cells, key=lambda v: (len(v), v)):
        xs = cells[value]
        p = sum(xs) / len(xs)
        out[qtype][grouping][value] = {"n": len(xs), "accuracy": round(p, 4),
                                       "se": round(math.sqrt(p * (1 - p) / len(xs)), 4)}
  return out


def evaluate(py: str, run: Path, out: Path) -> tuple[list[dict], dict]:
  """mm1-eval of `run`'s newest checkpoint (shapes_vqa, 0-shot, all questions, all
  predictions) into `out`; (samples, the eval's result file)."""
  cmd = [py, "-m", "mm1_jax", "eval", f"--workdir={out}", f"--checkpoint_dir={run / 'checkpoints'}",
         "--no_run_config", f"--gin_file={run / 'config.gin'}", "--benchmarks=shapes_vqa", "--shots=0",
         "--num_queries=0", "--steps=latest", "--gin.fewshot.FewShotConfig.num_samples=None"]
  if out.exists():
    shutil.rmtree(out)  # another run's evaluation of the same folder name, or of an older step
  run_logged(cmd, out / "eval_output.txt")
  newest = newest_eval(out)
  result = json.loads(newest.read_text())
  samples = json.loads(newest.with_name(newest.stem + "_samples.json").read_text())
  return samples["shapes_vqa/0shot"], {"command": " ".join(cmd[1:]), "step": result["step"],
                                       "scores": {k: round(v, 4) for k, v in result["results"].items()
                                                  if k.startswith("shapes_vqa/0shot/accuracy")}}


PROBE_TASKS = ",".join(probe_tasks.TASKS + probe_tasks.POSITION_TASKS)  # every shape by its place, and the count


def probe(py: str, gin_file: Path, init_from: Path, out: Path) -> dict:
  """mm1-probe of the trunk in `init_from` (MODEL of `gin_file`) on PROBE_TASKS; its command and result."""
  cmd = [py, "-m", "mm1_jax", "probe", f"--gin_file={gin_file}", f"--init_from={init_from}", f"--tasks={PROBE_TASKS}",
         "--no_progress", f"--json_out={out / 'probe.json'}"]
  run_logged(cmd, out / "probe_output.txt")
  return {"command": " ".join(cmd[1:]), **json.loads((out / "probe.json").read_text())}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", required=True, help="a training run's folder (repeatable)")
  p.add_argument("--out", default=str(DEFAULT_OUT), help="where the evaluations go (replaced on each call)")
  p.add_argument("--probe", action="store_true", help="also probe each run's trunk on every shape's place")
  p.add_argument("--probe_encoder", action="append", default=[], metavar="DIR",
                 help="also probe this trunk (an mm1-supervised --out) with the first run's MODEL (repeatable)")
  p.add_argument("--json_out", default=None, help="write the record here")
  args = p.parse_args(argv)
  import tasks  # noqa: F401, PLC0415  (registers the shapes-world seqio tasks)

  spec = tasks.shapes.CORPUS_SPEC
  git = record.git_state()
  rec = {**record_header(), "corpus": {"seed": spec.seed, "image_size": spec.image_size}, "runs": {}}
  for run in (Path(r).resolve() for r in args.run):  # mm1-eval runs from the repository root
    samples, result = evaluate(sys.executable, run, Path(args.out).resolve() / run.parent.name / run.name)
    if len(samples) != spec.num_eval_test:
      raise SystemExit(f"{run}: {len(samples)} predictions kept, not the {spec.num_eval_test} test questions")
    rec["runs"][str(run)] = {**result, "breakdown": tabulate(samples, spec.seed, spec.image_size)}
    print(json.dumps({str(run): rec["runs"][str(run)]["breakdown"]}, indent=1))
    if args.probe:
      out = Path(args.out).resolve() / run.parent.name / run.name
      rec["runs"][str(run)]["probe"] = probe(sys.executable, run / "config.gin", run / "checkpoints", out)
  if args.probe_encoder:
    first = Path(args.run[0]).resolve()
    rec["encoders"] = {str(Path(d).resolve()): probe(sys.executable, first / "config.gin", Path(d).resolve(),
                                                     Path(args.out).resolve() / "encoders" / Path(d).name)
                       for d in args.probe_encoder}
  if args.json_out:
    write_record(Path(args.json_out), rec, git=git, benchmark="vqa_breakdown")
  return 0


if __name__ == "__main__":
  sys.exit(main())
