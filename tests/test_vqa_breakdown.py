"""benchmarks/vqa_breakdown.py and the probe's position tasks: where VQA answers are lost."""

import pytest

from benchmarks import vqa_breakdown
from mm1_jax import probe
from mm1_jax.data import shapes_world as sw
from tasks import shapes as shapes_tasks

SPEC = shapes_tasks.CORPUS_SPEC  # the corpus the test split was written from


def _scene(*shapes):
  return [sw.Shape(kind, colour, "small", x, 32.0, 5.0) for kind, colour, x in shapes]


def test_position_labels_name_each_shape_by_its_place_and_none_past_the_last():
  labels = probe.task_labels()
  scene = _scene(("circle", "red", 10.0), ("triangle", "blue", 30.0))
  colours = list(sw.COLOURS)
  named = {t: labels[t][0][labels[t][1](scene)] for t in probe.TASKS + probe.POSITION_TASKS}
  assert named == {"count": "2", "colour": "red", "shape": "circle", "colour@1": "blue", "shape@1": "triangle",
                   "colour@2": "none", "shape@2": "none", "colour@3": "none", "shape@3": "none"}
  assert labels["colour@1"][0] == (*colours, "none")


def test_groups_count_places_from_the_left():
  scene = _scene(("circle", "red", 10.0), ("triangle", "blue", 30.0), ("square", "red", 50.0))
  assert vqa_breakdown.groups("what colour is the triangle?", scene) == {"shapes_in_scene": "3", "position": "1"}
  assert vqa_breakdown.groups("what colour is the square?", scene)["position"] == "2"
  assert vqa_breakdown.groups("what shape is the blue object?", scene)["position"] == "1"
  assert vqa_breakdown.groups("how many circles are there?", _scene(("square", "red", 10.0))) == {
      "shapes_in_scene": "1", "true_count": "0"}


def test_misses_say_whether_a_wrong_answer_names_another_shape_in_the_scene():
  scene = _scene(("circle", "red", 10.0), ("triangle", "blue", 30.0), ("square", "red", 50.0))
  miss = vqa_breakdown.miss
  assert miss("what colour is the triangle?", "Blue.", scene) is None  # right, after VQA normalisation
  assert miss("what colour is the triangle?", "red", scene) == "another_shape"  # the circle's and the square's
  assert miss("what colour is the triangle?", "green", scene) == "not_in_scene"
  assert miss("what colour is the triangle?", "a triangle", scene) == "no_attribute"
  assert miss("what shape is the blue object?", "circle", scene) == "another_shape"
  two = _scene(("circle", "red", 10.0), ("triangle", "blue", 30.0))
  assert miss("what shape is the blue object?", "square", two) == "not_in_scene"
  assert miss("what shape is the blue object?", "blue", two) == "no_attribute"
  assert miss("how many circles are there?", "7", two) is None
  # The right answer is right even when another shape shares it (the red circle beside the red triangle).
  shared = _scene(("circle", "red", 10.0), ("triangle", "red", 30.0), ("triangle", "blue", 50.0))
  assert miss("what colour is the circle?", "red", shared) is None
  assert miss("what shape is the blue object?", "triangle", shared) is None
  assert miss("what shape is the blue object?", "circle", shared) == "another_shape"


def test_named_places_say_which_shapes_a_wrong_answer_names():
  scene = _scene(("circle", "red", 10.0), ("triangle", "blue", 30.0), ("square", "red", 50.0))
  named = vqa_breakdown.named_places
  assert named("what colour is the triangle?", "Red.", scene) == "1->0+2"  # the circle's and the square's
  assert named("what colour is the square?", "blue", scene) == "2->1"
  assert named("what shape is the blue object?", "square", scene) == "1->2"
  for answer in ("blue", "green"):  # right; no shape's colour: neither names another shape's
    assert named("what colour is the triangle?", answer, scene) is None
  assert named("how many circles are there?", "2", scene) is None


def test_a_wrong_answer_is_checked_against_the_nearest_shape_and_chance():
  near = vqa_breakdown.names_the_nearest
  # Asked about the triangle at x=30: the circle at x=22 is nearest, the squares at x=50 and 60 are not.
  scene = [sw.Shape("circle", "red", "small", 22.0, 32.0, 5.0), sw.Shape("triangle", "blue", "small", 30.0, 32.0, 5.0),
           sw.Shape("square", "green", "small", 50.0, 32.0, 5.0), sw.Shape("square", "green", "small", 60.0, 32.0, 5.0)]
  assert near("what colour is the triangle?", "red", scene) == (True, 1 / 3)
  assert near("what colour is the triangle?", "green", scene) == (False, 1 / 3)
  assert near("what colour is the triangle?", "blue", scene) is None  # right
  # Nearest by centre distance in the plane, not by place from the left: the circle, far below,
  # gives way to the green square at x=50, which two of the three other shapes share.
  scene[0] = sw.Shape("circle", "red", "small", 28.0, 60.0, 5.0)
  assert near("what colour is the triangle?", "red", scene) == (False, 2 / 3)
  assert near("what colour is the triangle?", "green", scene) == (True, 2 / 3)
  assert near("what shape is the blue object?", "square", scene) == (True, 2 / 3)  # both squares are green
  # A shape of the asked colour cannot make a wrong answer: the nearest and the chance skip it.
  shared = [sw.Shape("circle", "blue", "small", 26.0, 32.0, 5.0),
            sw.Shape("triangle", "blue", "small", 30.0, 32.0, 5.0),
            sw.Shape("square", "red", "small", 40.0, 32.0, 5.0), sw.Shape("square", "green", "small", 60.0, 32.0, 5.0)]
  assert near("what colour is the triangle?", "red", shared) == (True, 1 / 2)
  assert near("what colour is the triangle?", "green", shared) == (False, 1 / 2)


def test_breakdown_regenerates_the_corpus_questions_and_groups_by_position():
  from mm1_jax.eval import fewshot

  test = fewshot.load_split("mm1_shapes_vqa_eval", "test")[:120]
  # A model that answers right exactly when the object asked about is the leftmost shape (and
  # every number question right): position 0 scores 1, every other position 0.
  samples, positions = [], []
  for q in test:
    shapes = vqa_breakdown.scene_of(q["id"], q["question"], SPEC.seed, SPEC.image_size)
    g = vqa_breakdown.groups(q["question"], shapes)
    right = g.get("position", "0") == "0"
    positions.append(g.get("position"))
    samples.append({"id": q["id"], "question": q["question"], "targets": q["answers"][:5],
                    "answer_type": q["answer_type"], "prediction": q["answers"][0] if right else "nothing"})
  assert {"0", "1"} <= set(positions)  # the split holds both kinds of question
  table = vqa_breakdown.tabulate(samples, SPEC.seed, SPEC.image_size)
  for qtype in ("colour", "shape"):
    by_pos = table[qtype]["position"]
    assert by_pos["0"]["accuracy"] == 1.0
    assert all(cell["accuracy"] == 0.0 for pos, cell in by_pos.items() if pos != "0")
    assert sum(cell["n"] for cell in by_pos.values()) == table[qtype]["all"]["all"]["n"]
    wrong = sum(cell["n"] for pos, cell in by_pos.items() if pos != "0")
    assert table[qtype]["misses"] == {"no_attribute": wrong}  # "nothing" names no colour or kind
  assert table["number"]["all"]["all"]["accuracy"] == 1.0
  assert set(table["number"]) == {"all", "shapes_in_scene", "true_count"}  # no misses: counts are not attributes


@pytest.mark.parametrize("named", ["nearest", "farthest"])
def test_breakdown_counts_the_places_and_the_nearest_shapes_that_wrong_answers_name(named):
  import math

  from mm1_jax.eval import fewshot

  # A model that, asked about a shape, names the colour (or kind) of the nearest, or the
  # farthest, of the shapes whose colour differs from the asked one's; right otherwise.
  samples = []
  for q in fewshot.load_split("mm1_shapes_vqa_eval", "test")[:120]:
    shapes = vqa_breakdown.scene_of(q["id"], q["question"], SPEC.seed, SPEC.image_size)
    prediction = q["answers"][0]
    if (asked := vqa_breakdown.asked_about(q["question"], shapes)) is not None:
      attribute = "colour" if q["answer_type"] == "colour" else "kind"
      value = lambda s: getattr(s, attribute)  # noqa: B023, E731
      others = sorted((s for s in shapes if value(s) != value(shapes[asked])),
                      key=lambda s: math.hypot(s.x - shapes[asked].x, s.y - shapes[asked].y))  # noqa: B023
      pick = (others[0] if named == "nearest" else others[-1]) if others else None
      if pick is not None and (named == "nearest" or value(pick) != value(others[0])):
        prediction = value(pick)
    samples.append({"id": q["id"], "question": q["question"], "targets": q["answers"][:5],
                    "answer_type": q["answer_type"], "prediction": prediction})
  table = vqa_breakdown.tabulate(samples, SPEC.seed, SPEC.image_size)
  for qtype in ("colour", "shape"):
    wrong = table[qtype]["misses"]
    nearest, by_place = table[qtype]["misses_nearest"], table[qtype]["misses_by_place"]
    assert set(wrong) == {"another_shape"} and wrong["another_shape"] > 0
    assert nearest["another_shape"] == sum(by_place.values()) == wrong["another_shape"]
    assert nearest["names_the_nearest"] == (wrong["another_shape"] if named == "nearest" else 0)
    # Some scenes hold more than one colour (kind) besides the asked one's: chance is below all, above none.
    assert 0 < nearest["expected_by_chance"] < wrong["another_shape"] and nearest["chance_sd"] > 0
    for key in by_place:  # "<asked>-><named>": the asked shape is never among those named
      asked, names = key.split("->")
      assert asked not in names.split("+")


def test_breakdown_stops_on_a_scene_that_does_not_match_the_question():
  from mm1_jax.eval import fewshot

  q = fewshot.load_split("mm1_shapes_vqa_eval", "test")[0]
  with pytest.raises(SystemExit, match="another corpus seed"):  # no scene of the world asks this
    vqa_breakdown.scene_of(q["id"], "what colour is the hexagon?", SPEC.seed, SPEC.image_size)
