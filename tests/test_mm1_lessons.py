"""benchmarks/mm1_lessons.py: each level's difference from the base level and its standard errors."""

import math

import pytest

from benchmarks import mm1_lessons
from mm1_jax import sweep

COUNTS = {"shapes_vqa": {"all": 400, "shape": 100, "colour": 100, "number": 200}}


def _table(values: dict[str, dict[str, list[float]]]) -> dict:
  cells = [{"cell": cell, "stats": {m: {**sweep.summarize(v), "values": v} for m, v in per.items()}}
           for cell, per in values.items()]
  return {"cells": cells}


def test_contrast_against_the_base_with_seed_and_question_errors():
  table = _table({
      "lesson-base": {"shapes_vqa/0shot/accuracy/shape": [0.4, 0.5], "shapes_caption/0shot/cider": [1.0, 1.2],
                      "train/loss": [1.0, 1.1]},
      "lesson-x": {"shapes_vqa/0shot/accuracy/shape": [0.6, 0.7], "shapes_caption/0shot/cider": [1.5, 1.5],
                   "train/loss": [0.9, 1.0]},
  })
  out = mm1_lessons.contrasts(table, COUNTS, "lesson-base")
  assert set(out) == {"lesson-x"}  # the base is not compared with itself
  acc = out["lesson-x"]["shapes_vqa/0shot/accuracy/shape"]
  # Worked by hand: SE over seeds 0.05 per level. Over questions: the 100 shape questions (not
  # all 400; the two seeds answer the same ones, so not 200 either), at the means 0.65 and 0.45.
  assert acc["difference"] == pytest.approx(0.2)
  assert acc["se_over_seeds"] == pytest.approx(0.0707, abs=1e-4)
  assert acc["se_over_questions"] == pytest.approx(0.0689, abs=1e-4)
  assert acc["in_se"] == pytest.approx(0.2 / (math.sqrt(2) * 0.05), abs=0.01)  # the larger of the two
  cider = out["lesson-x"]["shapes_caption/0shot/cider"]
  assert "se_over_questions" not in cider  # not a share of questions
  assert cider["difference"] == pytest.approx(0.4) and cider["in_se"] == pytest.approx(0.4 / 0.1, abs=0.01)
  assert "se_over_questions" not in out["lesson-x"]["train/loss"]


def test_a_study_without_its_base_level_stops():
  with pytest.raises(SystemExit, match="no 'lesson-base' cell"):
    mm1_lessons.contrasts(_table({"lesson-x": {"m": [1.0]}}), COUNTS, "lesson-base")


def test_every_study_names_a_shipped_sweep_whose_levels_include_its_base():
  from mm1_jax import gin_files

  for sweep_file, base, _ in mm1_lessons.STUDIES.values():
    cells = sweep.expand(sweep.read_sweep_file(sweep_file, gin_files.search_paths()))
    assert base in {c.slug for c in cells}


def test_question_counts_of_the_test_splits():
  # The standard errors over questions divide by these: the 512 VQA test questions by answer
  # type (the split test_sft checks its scores against) and the 256 text questions.
  counts = mm1_lessons.question_counts()
  assert counts["shapes_vqa"] == {"all": 512, "number": 275, "shape": 119, "colour": 118}
  assert counts["shapes_textqa"] == {"all": 256, "corners": 128, "group": 128}
