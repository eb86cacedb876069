"""CIDEr-D and VQA accuracy."""

import math

import pytest

from mm1_jax.eval import metrics


def test_vqa_normalisation_cases():
  cases = {
      "Two": "2", "two.": "2", "the red one": "red 1", "A circle!": "circle", "yes,": "yes",
      "dont": "don't", "3.5": "3.5", "  blue\n": "blue", "an orange": "orange",
  }
  for raw, norm in cases.items():
    assert metrics.normalize_answer(raw) == norm, raw


def test_vqa_accuracy_leave_one_out():
  answers = ["2"] * 10
  assert metrics.vqa_accuracy("two", answers) == 1.0
  assert metrics.vqa_accuracy("3", answers) == 0.0
  # Two of ten annotators say "red": each 9-subset has 1 or 2 matches -> (8 * 2/3 + 2 * 1/3) / 10.
  answers = ["red", "red"] + ["orange"] * 8
  assert metrics.vqa_accuracy("red", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
  # Three or more agreeing annotators saturate at 1 only when every subset keeps three.
  answers = ["red"] * 4 + ["orange"] * 6
  assert metrics.vqa_accuracy("red", answers) == 1.0
  answers = ["red"] * 3 + ["orange"] * 7
  assert metrics.vqa_accuracy("red", answers) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
  with pytest.raises(ValueError):
    metrics.vqa_accuracy("red", [])


def _refs():
  return {
      "a": ["a red circle.", "a picture of a red circle.", "there is a red circle."],
      "b": ["two blue squares.", "an image with two blue squares.", "there are two blue squares."],
      "c": ["a green triangle and a red square.", "a picture of a green triangle and a red square."],
  }


def test_cider_orders_predictions_sensibly():
  refs = _refs()
  perfect = {k: v[1] for k, v in refs.items()}
  close = {"a": "a picture of a blue circle.", "b": "an image with two blue circles.",
           "c": "a picture of a green triangle."}
  wrong = {"a": "two blue squares.", "b": "a green triangle.", "c": "a red circle."}
  s_perfect, s_close, s_wrong = (metrics.cider(refs, p) for p in (perfect, close, wrong))
  assert s_perfect > s_close > s_wrong >= 0.0
  assert metrics.cider(refs, {k: "" for k in refs}) == 0.0


def test_cider_single_image_hand_computed():
  # With one image every n-gram's idf is log(1) - log(1) = 0, so CIDEr is 0:
  # CIDEr only rewards n-grams that tell images apart.
  assert metrics.cider({"x": ["a red circle"]}, {"x": "a red circle"}) == 0.0


def test_cider_two_images_hand_computed():
  # Unigram-only toy check of the tf-idf cosine with two one-word captions.
  refs = {"x": ["red"], "y": ["blue"]}
  score = metrics.cider(refs, {"x": "red", "y": "blue"})
  # Each image: unigram cosine 1 (idf log 2 on both sides), n = 2..4 empty -> 0.
  # Mean over n = 1..4 is 1/4; times 10 -> 2.5, length penalty exp(0) = 1.
  assert score == pytest.approx(2.5)
  assert math.isclose(metrics.cider(refs, {"x": "blue", "y": "red"}), 0.0)


def test_cider_rejects_missing_references():
  with pytest.raises(ValueError, match="no references"):
    metrics.cider({"x": ["red"]}, {"y": "red"})
