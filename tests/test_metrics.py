"""CIDEr-D (against pycocoevalcap), PTB-style tokenisation, VQA accuracy, exact match."""

import math
import random

import pytest

from mm1_jax.eval import metrics


# Raw answer -> what the official VQA normalisation makes of it.
VQA_CASES = {
    "Two": "2", "two.": "2", "the red one": "red 1", "A circle!": "circle", "yes,": "yes",
    "dont": "don't", "3.5": "3.5", "  blue\n": "blue", "an orange": "orange",
    "None": "0", "ten": "10", "eleven": "eleven",  # only zero..ten are mapped
    "Yes.": "yes", "no!": "no", "a b c": "b c",
    "t-shirt": "t shirt",  # a mark with no space beside it becomes a space
    "t - shirt": "t shirt",  # ... next to a space it is deleted
    "1,000": "1000",  # digit-comma-digit: every mark is deleted
    "2,5 - 3": "25 3", "(red)": "red", "red/blue": "red blue", "red / blue": "red blue",
    "isnt": "isn't", "whats": "what's", "wouldnt've": "wouldn't've", "Im": "im",  # capital keys never match
    "10:30": "10:30",  # the colon is not in the mark list
    "e.g.": "eg", "mr. smith": "mr smith", "3.": "3", ".5": ".5",
    "it's": "it's", "dog's": "dog's", "@home": "home", "x+y": "x y", "a+b": "b",  # then the article goes
}


def test_vqa_normalisation_cases():
  for raw, norm in VQA_CASES.items():
    assert metrics.normalize_answer(raw) == norm, raw


def test_vqa_accuracy_tricky_answers():
  assert metrics.vqa_accuracy("Two", ["2"] * 10) == 1.0
  assert metrics.vqa_accuracy("The T-Shirt.", ["t shirt"] * 10) == 1.0
  assert metrics.vqa_accuracy("1,000", ["1000"] * 10) == 1.0
  assert metrics.vqa_accuracy("shirt", ["t shirt"] * 10) == 0.0
  assert metrics.vqa_accuracy("isnt", ["isn't"] * 10) == 1.0
  assert metrics.exact_match("The Left.", "left") == 1.0
  assert metrics.exact_match("left side", "left") == 0.0


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


PTB_CASES = {
    "A man's dog.": "a man 's dog",
    "I don't know": "i do n't know",
    "He cannot go!": "he can not go",
    "won't stop": "wo n't stop",
    "they're gonna win": "they 're gon na win",
    "A black-and-white photo of the U.S. flag.": "a black-and-white photo of the u.s. flag",
    "It costs $5, about 50%.": "it costs $ 5 about 50 %",
    "3,000 people; 12.5 inches": "3,000 people 12.5 inches",
    "(a cat) on a mat...": "a cat on a mat",
    "\"Quoted\" word": "quoted word",
    "Dogs' toys": "dogs toys",
    "Mr. Smith's car": "mr. smith 's car",
    "A dog\nrunning": "a dog running",
}


def test_ptb_tokenize_cases():
  for raw, toks in PTB_CASES.items():
    assert " ".join(metrics.ptb_tokenize(raw)) == toks, raw


def test_ptb_tokenize_is_idempotent():
  for raw in PTB_CASES:
    toks = metrics.ptb_tokenize(raw)
    assert metrics.ptb_tokenize(" ".join(toks)) == toks


def _random_caption_sets(n_images: int, seed: int):
  rng = random.Random(seed)
  vocab = ("a an the red blue green yellow circle square triangle two three small large dog cat man "
           "woman on of with next to sitting standing near picture image photo there is are and").split()
  refs, preds = {}, {}
  for i in range(n_images):
    key = f"img{i}"
    base = [rng.choice(vocab) for _ in range(rng.randint(3, 9))]
    refs[key] = []
    for _ in range(rng.randint(1, 5)):  # references vary around a shared base, as real ones do
      r = list(base)
      for _ in range(rng.randint(0, 3)):
        r.insert(rng.randint(0, len(r)), rng.choice(vocab))
      refs[key].append(" ".join(r))
    p = list(base)
    for _ in range(rng.randint(0, 4)):
      if p and rng.random() < 0.5:
        p.pop(rng.randrange(len(p)))
      else:
        p.insert(rng.randint(0, len(p)), rng.choice(vocab))
    preds[key] = " ".join(p) if rng.random() > 0.02 else ""
  return refs, preds


@pytest.mark.parametrize("seed,n_images", [(0, 300), (1, 200), (2, 40), (3, 2)])
def test_cider_matches_pycocoevalcap(seed, n_images):
  from pycocoevalcap.cider.cider import Cider

  refs, preds = _random_caption_sets(n_images, seed)
  expected, _ = Cider().compute_score(refs, {k: [v] for k, v in preds.items()})
  assert metrics.cider(refs, preds) == pytest.approx(expected, abs=1e-6)


def test_seqio_metric_functions():
  refs, preds = _random_caption_sets(20, 5)
  keys = sorted(refs)
  assert metrics.cider_metric([refs[k] for k in keys], [preds[k] for k in keys]) == {
      "cider": pytest.approx(metrics.cider(refs, preds))}
  assert metrics.vqa_metric([["2"] * 10, ["red"] * 10], ["two", "blue"]) == {"accuracy": 0.5}
  assert metrics.exact_match_metric([["left"], ["yes"]], ["left", "no"]) == {"exact_match": 0.5}
  with pytest.raises(ValueError):
    metrics.vqa_metric([["2"]], ["2", "3"])
