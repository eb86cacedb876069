"""Property-based tests: random and malformed input to the record checks, the model-side
preprocessor and the metric functions. None may raise on data; each keeps its invariants."""

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm1_jax.data import formats
from mm1_jax.data.tokenizer import IMAGE_ID, IMAGE_TOKEN
from mm1_jax.eval import metrics

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,  # the same examples in every CI run
                    suppress_health_check=[HealthCheck.too_slow])
CHECKS = formats.Checks(min_image_size=8, max_images=3, max_image_side=48)  # small: fast examples

MODES = ["RGB", "L", "RGBA", "LA", "P", "CMYK", "1", "I;16"]
FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]


@st.composite
def encoded_images(draw):
  """(bytes, size) of a random image in a random mode and container format."""
  from PIL import Image
  w, h = draw(st.integers(1, 80)), draw(st.integers(1, 80))
  mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
  seed = draw(st.integers(0, 2**16))
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  img = Image.fromarray(pixels).convert(mode)
  out = io.BytesIO()
  try:
    img.save(out, format=fmt)
  except (OSError, ValueError, KeyError):  # a mode this container cannot hold: store as PNG
    out = io.BytesIO()
    img.convert("RGB").save(out, format="PNG")
  return out.getvalue(), (w, h)


def _assert_stored_image(data: bytes):
  from PIL import Image
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    assert im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L")
    assert CHECKS.min_image_size <= min(im.size) and max(im.size) <= CHECKS.max_image_side


@SETTINGS
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_an_image_or_a_reason(data):
  out = formats.normalize_image(data, CHECKS)
  if isinstance(out, str):
    assert out in formats.REASONS
  else:
    _assert_stored_image(out)


@SETTINGS
@given(encoded_images(), st.integers(0, 200))
def test_any_image_is_stored_as_rgb_or_grey_jpeg_png_or_skipped(image, cut):
  data, (w, h) = image
  if cut:  # a truncated download
    data = data[: max(1, len(data) - cut)]
  out = formats.normalize_image(data, CHECKS)
  if isinstance(out, str):
    assert out in ("corrupt_image", "image_too_small")
    if out == "image_too_small" and not cut:
      scale = min(1.0, CHECKS.max_image_side / max(w, h))
      assert min(w, h) * scale < CHECKS.min_image_size + 1
  else:
    _assert_stored_image(out)


# Text with the marker in it literally (HTML dumps have it), line breaks, any UTF-8.
text_pieces = st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | st.just(IMAGE_TOKEN)
                       | st.just("\n"), max_size=5).map("".join)


@SETTINGS
@given(st.lists(st.one_of(st.tuples(st.just("text"), text_pieces),
                          st.tuples(st.just("text"), st.binary(max_size=12)),
                          st.tuples(st.just("image"), encoded_images().map(lambda x: x[0])),
                          st.tuples(st.just("image"), st.binary(max_size=30))), max_size=8))
def test_interleaved_documents_keep_one_marker_per_image(pieces):
  """Documents from random pieces (undecodable text, corrupt images, literal markers):
  every kept document has exactly one marker per image, within the image budget."""
  records = list(formats._interleaved("doc", pieces, root=None))
  *skips, ex = records
  assert all(isinstance(s, formats.Skip) and s.reason in formats.REASONS for s in skips)
  n_images = sum(what == "image" and isinstance(v, bytes) for what, v in pieces)
  assert ex.text.count(IMAGE_TOKEN) == len(ex.images) == n_images
  out, dropped, truncated = formats.check(ex, CHECKS)
  assert all(d.image_only and d.reason in formats.REASONS for d in dropped)
  if isinstance(out, formats.Skip):
    assert out.reason in ("no_text", "no_images")
    return
  assert out.text.count(IMAGE_TOKEN) == len(out.images) <= CHECKS.max_images
  assert truncated == (n_images - len(dropped) > CHECKS.max_images)
  for image in out.images:
    _assert_stored_image(image)


@SETTINGS
@given(st.one_of(text_pieces, st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2)),
       st.sampled_from(["caption", "text", "interleaved"]), encoded_images())
def test_malformed_records_are_skipped_not_raised(text, kind, image):
  ex = formats.Example(kind, "r", text, [image[0]] if kind != "text" else [])
  out, dropped, _ = formats.check(ex, CHECKS)
  if not isinstance(text, str):
    assert isinstance(out, formats.Skip) and out.reason == "bad_record"
  elif isinstance(out, formats.Example):
    assert out.text.count(IMAGE_TOKEN) == (len(out.images) if kind == "interleaved" else 0)
  else:
    assert out.reason in formats.REASONS


# --- the model-side preprocessor -------------------------------------------------------

@SETTINGS
@given(st.lists(st.integers(5, 40) | st.just(IMAGE_ID), max_size=40), st.integers(1, 60),
       st.integers(1, 5), st.integers(0, 4))
def test_truncate_and_expand_images_never_splits_an_image(tokens, max_len, q, max_images):
  import tensorflow as tf

  from mm1_jax.data.preprocessors import truncate_and_expand_images
  n_img = tokens.count(IMAGE_ID)
  images = np.arange(max(n_img, 0) * 4 * 4 * 3, dtype=np.uint8).reshape(n_img, 4, 4, 3) % 251
  out = truncate_and_expand_images({"text": tf.constant(tokens, tf.int32), "images": tf.constant(images)},
                                   max_len=max_len, tokens_per_image=q, max_images=max_images, image_size=4,
                                   image_id=IMAGE_ID)
  text, imgs = out["text"].numpy().tolist(), out["images"].numpy()
  assert len(text) <= max_len
  kept = len(imgs)
  assert kept <= max_images and text.count(IMAGE_ID) == kept * q
  # The output is the expansion of a prefix of the input, and that prefix is the longest
  # one that fits both budgets.
  expansion, n = [], 0
  for t in tokens:
    piece = [t] * (q if t == IMAGE_ID else 1)
    if len(expansion) + len(piece) > max_len or (t == IMAGE_ID and n + 1 > max_images):
      break
    expansion += piece
    n += t == IMAGE_ID
  assert text == expansion
  np.testing.assert_array_equal(imgs, images[:kept])
  # The grain loader's cut (`split_document` with split=False) is the same prefix.
  from mm1_jax.data.documents import split_document
  cut = split_document(np.asarray(tokens, np.int32), max_len, q, max_images, image_id=IMAGE_ID, split=False)
  assert [c[0].tolist() for c in cut] == ([expansion] if n_prefix_ids(tokens, expansion, q) >= 2 else [])


def n_prefix_ids(tokens, expansion, q):
  """How many of the document's ids an expanded prefix holds."""
  n, length = 0, 0
  while length < len(expansion):
    length += q if tokens[n] == IMAGE_ID else 1
    n += 1
  return n


@SETTINGS
@given(st.lists(st.integers(5, 40) | st.just(IMAGE_ID), max_size=60), st.integers(1, 40),
       st.integers(1, 5), st.integers(0, 4))
def test_split_document_cuts_a_document_into_pieces_that_fit(tokens, max_len, q, max_images):
  """Each example fits both budgets, holds whole images and is a run of the document's ids;
  the examples follow one another, and leave nothing out when two images and text fit a
  sequence and the document ends in text (as every document ends in EOS)."""
  from mm1_jax.data.documents import chunk_bounds, split_document
  ids = np.asarray(tokens, np.int32)
  chunks = split_document(ids, max_len, q, max_images, image_id=IMAGE_ID)
  bounds = chunk_bounds(ids == IMAGE_ID, max_len, q, max_images)
  assert len(bounds) == len(chunks)
  for (text, (first, end), _), (a, b) in zip(chunks, bounds):
    assert 2 <= b - a and len(text) <= max_len and end - first <= max_images
    assert text.tolist() == [t for t in tokens[a:b] for _ in range(q if t == IMAGE_ID else 1)]
    assert first == tokens[:a].count(IMAGE_ID) and end == tokens[:b].count(IMAGE_ID)
  ends = [0] + [b for _, b in bounds]
  starts = [a for a, _ in bounds] + [len(tokens)]
  gaps = [s - e for e, s in zip(ends, starts)]
  assert all(g >= 0 for g in gaps)  # in order, never overlapping
  if max_images >= 2 and max_len >= 2 * q + 2 and len(tokens) >= 2 and tokens[-1] != IMAGE_ID:
    assert not any(gaps), (bounds, gaps)  # documents end in EOS: nothing is dropped


# --- metrics -----------------------------------------------------------------------------

any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
# Caption-like text: words in mixed case with clitics, quotes, brackets and punctuation.
caption_words = st.lists(st.sampled_from(
    ["A", "Man's", "DON'T", "cannot", "Two", "dogs,", "(red)", '"Hi!"', "U.S.", "Mr.", "it's.", "wait...",
     "3.5", "1,000", "$5", "50%", "--", "''", "``", ";", "?", "x", "Gonna", "they're", "e.g.", "[big]"]),
    max_size=12).map(" ".join)
# The punctuation tokens the COCO caption toolkit removes after PTB tokenisation.
COCO_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]",
                    "{", "}", '"'}


@SETTINGS
@given(any_text | caption_words)
def test_ptb_tokens_are_nonempty_words(text):
  """Tokens are non-empty, lower case, free of the punctuation the COCO toolkit drops, and
  pieces of the lower-cased text in their original order. Catches a missing lower-casing
  (CIDEr then counts "A" and "a" as different words), punctuation tokens kept in the
  n-grams, clitics emitted before their word ("'s man"), and tokens the text never held."""
  tokens = metrics.ptb_tokenize(text)
  assert all(t and not any(c.isspace() for c in t) for t in tokens)
  assert metrics.tokenize_caption(text) == tokens
  assert all(t == t.lower() for t in tokens) and metrics.ptb_tokenize(text.lower()) == tokens
  assert not COCO_PUNCTUATION & set(tokens)
  lowered, pos = text.lower(), 0
  for t in tokens:
    pos = lowered.find(t, pos)
    assert pos >= 0, (t, tokens)
    pos += len(t)


@SETTINGS
@given(any_text, st.lists(any_text, min_size=1, max_size=10))
def test_vqa_accuracy_is_a_function_of_agreeing_annotators(prediction, answers):
  acc = metrics.vqa_accuracy(prediction, answers)
  assert 0.0 <= acc <= 1.0
  assert acc == pytest.approx(metrics.vqa_accuracy(prediction, list(reversed(answers))), abs=1e-12)
  matches = sum(metrics.normalize_answer(a) == metrics.normalize_answer(prediction) for a in answers)
  # The official leave-one-out average, by the number of agreeing annotators alone.
  n, k = len(answers), matches
  want = float(k > 0) if n == 1 else (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n
  assert acc == pytest.approx(want)
  if k == 0 or k >= 4:
    assert acc == float(k >= 4)


@SETTINGS
@given(any_text, any_text)
def test_exact_match_is_symmetric_and_binary(a, b):
  assert metrics.exact_match(a, b) == metrics.exact_match(b, a) in (0.0, 1.0)
  assert metrics.exact_match(a, a) == 1.0


@SETTINGS
@given(st.lists(st.tuples(st.lists(any_text, min_size=1, max_size=4), any_text), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_cider_is_finite_nonnegative_and_order_free(pairs, rnd):
  refs = {str(i): r for i, (r, _) in enumerate(pairs)}
  preds = {str(i): p for i, (_, p) in enumerate(pairs)}
  score = metrics.cider(refs, preds)
  assert math.isfinite(score) and score >= 0.0
  order = list(range(len(pairs)))
  rnd.shuffle(order)
  shuffled = metrics.cider({f"k{j}": refs[str(i)] for j, i in enumerate(order)},
                           {f"k{j}": preds[str(i)] for j, i in enumerate(order)})
  assert shuffled == pytest.approx(score, rel=1e-9, abs=1e-12)
  # The seqio wrapper takes the same data as lists.
  wrapped = metrics.cider_metric([refs[str(i)] for i in range(len(pairs))],
                                 [preds[str(i)] for i in range(len(pairs))])
  assert wrapped == {"cider": pytest.approx(score, rel=1e-9, abs=1e-12)}
