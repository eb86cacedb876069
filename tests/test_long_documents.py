"""Long documents: a record that does not fit one sequence continues into further examples
(both loaders), resumably (grain), counted; and the ids come from the task's vocabulary."""

import collections
import io
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from mm1_jax.data import corpus, documents, loader, pipeline, sources, tokenizer, vocabulary
from mm1_jax.data import preprocessors as prep

SEQ_LEN, MAX_IMAGES, Q, SIZE = 64, 2, 4, 32
WORDS = "a red blue green circle square triangle big small and the is on of".split()


def _png(v: int) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.new("RGB", (40, 40), (v, 255 - v, v // 2)).save(buf, format="PNG")
  return buf.getvalue()


def _sentence(rng, n: int) -> str:
  return " ".join(rng.choice(WORDS, n)) + ".\n"


def _document(rng, n_images: int, words: int) -> str:
  return "".join(f"<image>{_sentence(rng, words)}" for _ in range(n_images))


def _tiny_vocab(path) -> seqio.Vocabulary:
  """A SentencePiece model whose special pieces are not where the bundled one has them:
  unk 0, <x> 1, eos 2, <y> 3, <z> 4, <w> 5, <image> 6, newline 7."""
  import sentencepiece as spm

  rng = np.random.default_rng(0)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([_sentence(rng, 12) for _ in range(200)]), model_writer=model, vocab_size=80,
      model_type="bpe", character_coverage=1.0, unk_id=0, eos_id=2, bos_id=-1, pad_id=-1,
      user_defined_symbols=["<x>", "<y>", "<z>", "<w>", "<image>", "\n"], normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  path.write_bytes(model.getvalue())
  vocab = seqio.SentencePieceVocabulary(str(path))
  ids = vocabulary.special_ids(vocab)
  assert (ids.image, ids.eos) == (6, 2)  # not the bundled model's 3 and 1
  return vocab


def _register(tmp_path, name: str, vocab: seqio.Vocabulary, docs: list[tuple[str, list[int]]]) -> str:
  """Writes interleaved records (text, image colours) and registers them as task <name>_interleaved."""
  shards = corpus.ShardWriter(tmp_path / name / "interleaved", "train-raw", 1)
  for i, (text, colours) in enumerate(docs):
    shards.write(corpus.tf_example({"id": f"d{i}", "text": text, "images": [_png(c) for c in colours]}))
  shards.close()
  features = {"text": seqio.Feature(vocab, add_eos=True),
              prep.OUTPUT_IMAGE_KEY: seqio.ContinuousFeature(dtype=tf.uint8, rank=4, required=False)}
  sources.register_corpus(name, tmp_path / name, image_size=SIZE, output_features=features,
                          kinds=("interleaved",), rates={"interleaved": 1.0})
  return f"{name}_interleaved"


def _expanded(vocab, text: str) -> list[int]:
  ids = vocabulary.special_ids(vocab)
  out = []
  for t in list(vocab.encode(text)) + [ids.eos]:
    out += [t] * (Q if t == ids.image else 1)
  return out


def _rows(cfg, kind: str, stats: collections.Counter):
  if kind == "grain":
    it = loader.make_loader(cfg, tokens_per_image=Q, image_size=SIZE, num_epochs=1)
    rows = [{k: v[i] for k, v in b.items()} for b in it for i in range(len(b["tokens"]))]
    stats.update(it.stats())
    return rows
  ds = pipeline.make_dataset(cfg, tokens_per_image=Q, image_size=SIZE, num_epochs=1, stats=stats)
  return [{k: v[i] for k, v in b.items()} for b in pipeline.iterate(ds) for i in range(len(b["tokens"]))]


def _row_ids(row) -> list[int]:
  """An unpacked row's example: its inputs and the last target."""
  n = int((row["segment_ids"] > 0).sum())
  return row["tokens"][:n].tolist() + [int(row["targets"][n - 1])]


@pytest.mark.parametrize("vocab_name", ["shapes", "tiny"])
@pytest.mark.parametrize("kind", ["grain", "tfdata"])
def test_a_long_document_continues_into_further_examples(tmp_path, kind, vocab_name):
  """A document 3x one sequence in images and in tokens becomes examples that, in order,
  hold all its ids and images (none dropped, nothing repeated); then the next document.
  With the tiny vocabulary the image, EOS and pad ids are that vocabulary's: a loader with
  the bundled model's constants would count its `<y>` pieces as images and skip every record."""
  vocab = (seqio.SentencePieceVocabulary(str(tokenizer.DEFAULT_SPM_PATH)) if vocab_name == "shapes"
           else _tiny_vocab(tmp_path / "tiny.model"))
  ids = vocabulary.special_ids(vocab)
  rng = np.random.default_rng(1)
  long_text, short_text = _document(rng, 3 * MAX_IMAGES, 30), _document(rng, 1, 5)
  long_ids = _expanded(vocab, long_text)
  assert len(long_ids) > 3 * (SEQ_LEN + 1)  # the setup: 3x one sequence in tokens, and in images
  colours = [[20 + 30 * i for i in range(3 * MAX_IMAGES)], [250]]
  task = _register(tmp_path, f"long_{vocab_name}", vocab, [(long_text, colours[0]), (short_text, colours[1])])
  cfg = pipeline.DataConfig(mixture_or_task_name=task, batch_size=1, seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                            pack=False, shuffle=False, module_imports=(), loader=kind)
  stats = collections.Counter()
  rows = _rows(cfg, kind, stats)
  examples = [_row_ids(r) for r in rows]
  assert len(examples) >= 4  # at least 3 for the long document, 1 for the short one
  assert sum(examples[:-1], []) == long_ids and examples[-1] == _expanded(vocab, short_text)
  assert examples[-2][-1] == ids.eos and all(e[-1] != ids.eos for e in examples[:-2])  # EOS: only the end
  for row, ex in zip(rows, examples):
    assert len(ex) <= SEQ_LEN + 1 and ex.count(ids.image) <= Q * MAX_IMAGES
    n_images = ex.count(ids.image) // Q
    assert ex.count(ids.image) % Q == 0  # an image's run is never split
    assert not row["loss_weights"][row["targets"] == ids.image].any()
    n = int((row["segment_ids"] > 0).sum())
    assert (row["tokens"][n:] == ids.pad).all()
    assert (row["images"][n_images:] == 0).all()
  # Every image, in document order, each in the example that holds its placeholders.
  seen = [int(r["images"][j, 0, 0, 0]) for r, e in zip(rows, examples) for j in range(e.count(ids.image) // Q)]
  np.testing.assert_allclose(seen, colours[0] + colours[1], atol=2)
  assert stats["documents_split"] == 1 and stats["chunks"] == len(examples) - 1


@pytest.mark.parametrize("rows", [1, 3])
def test_resuming_in_the_middle_of_a_long_document_continues_it(tmp_path, rows):
  """A grain loader restored from any batch's saved state yields exactly the batches an
  uninterrupted one yields after it, including states saved inside a long document, and
  counts each split document once."""
  vocab = seqio.SentencePieceVocabulary(str(tokenizer.DEFAULT_SPM_PATH))
  rng = np.random.default_rng(2)
  docs = [(_document(rng, 3 * MAX_IMAGES, 30), [20 + 30 * i for i in range(6)]) for _ in range(3)]
  docs += [(_document(rng, 1, 5), [200 + i]) for i in range(5)]
  task = _register(tmp_path, "resume", vocab, docs)
  cfg = pipeline.DataConfig(mixture_or_task_name=task, batch_size=2, seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                            seed=3, module_imports=(), pack_rows=rows)
  kw = dict(tokens_per_image=Q, image_size=SIZE, num_epochs=1)
  full = loader.make_loader(cfg, **kw)
  want = list(full)
  assert full.stats()["documents_split"] == 3 and full.stats()["chunks"] >= 9
  inside = 0
  for k in range(len(want)):
    it = loader.make_loader(cfg, **kw)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    inside += bool(state.get("chunk"))
    resumed = loader.make_loader(cfg, **kw)
    resumed.set_state(state)
    got = list(resumed)
    assert len(got) == len(want) - k
    for g, w in zip(got, want[k:]):
      for key in w:
        np.testing.assert_array_equal(g[key], w[key], err_msg=f"batch after {k}: {key}")
    assert resumed.stats() == full.stats()
  assert inside  # some states were saved in the middle of a document


def test_split_documents_false_cuts_as_before(tmp_path):
  vocab = seqio.SentencePieceVocabulary(str(tokenizer.DEFAULT_SPM_PATH))
  rng = np.random.default_rng(1)
  text = _document(rng, 3 * MAX_IMAGES, 30)
  task = _register(tmp_path, "cut", vocab, [(text, [20 + 30 * i for i in range(6)])])
  cfg = pipeline.DataConfig(mixture_or_task_name=task, batch_size=1, seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                            pack=False, shuffle=False, module_imports=(), split_documents=False)
  stats = collections.Counter()
  rows = _rows(cfg, "grain", stats)
  assert len(rows) == 1 and _expanded(vocab, text)[:len(_row_ids(rows[0]))] == _row_ids(rows[0])
  assert stats["documents_split"] == 0


def test_chunk_bounds_keep_images_with_the_text_after_them():
  """A cut that would leave an image at the end of an example moves it to the next one;
  a lone EOS at the end takes the id before it along."""
  img = np.arange(10) == 4
  # max_len 7 with Q = 3: greedy would cut after the image ([0, 5)), then leave id 9 alone.
  assert documents.chunk_bounds(img, 7, 3, 4) == [(0, 4), (4, 8), (8, 10)]
  assert documents.chunk_bounds(img, 7, 3, 4, split=False) == [(0, 5)]  # the cut alone: the longest prefix
  # No images: 8 ids, at most 7 per example.
  assert documents.chunk_bounds(np.zeros(8, bool), 7, 3, 4) == [(0, 6), (6, 8)]


def test_build_keeps_long_documents_and_counts_those_over_one_mm1_sequence(tmp_path):
  """A 20-image document is written whole (the loaders split it) and counted as over 16
  images; with a tokenizer, a 2-image document of over 4,096 tokens counts as over one
  sequence too."""
  from mm1_jax.data import build

  (tmp_path / "pics").mkdir()
  (tmp_path / "pics" / "a.png").write_bytes(_png(90))
  rows = [{"texts": ["Many"] + [None, "more"] * 20, "images": [None] + ["pics/a.png", None] * 20},
          {"texts": ["Long", None, "red circle " * 3000, None, "end"], "images": [None, "pics/a.png", None,
                                                                                "pics/a.png", None]},
          {"texts": ["Short", None, "a red circle."], "images": [None, "pics/a.png", None]}]
  src = tmp_path / "docs.jsonl"
  src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  report = build.build("obelics", src, tmp_path / "out", progress=False, num_shards=1)
  assert report["written"] == {"interleaved": 3} and report["truncated_documents"] == 0
  assert report["images_written"] == 23 and report["interleaved_over_16_images"] == 1
  assert "interleaved_over_4096_tokens_or_16_images" not in report  # no tokenizer: images only
  report = build.build("obelics", src, tmp_path / "out2", progress=False, num_shards=1, tokenizer="shapes_sp")
  assert report["interleaved_over_16_images"] == 1
  assert report["interleaved_over_4096_tokens_or_16_images"] == 2
  assert report["interleaved_examples_at_mm1_shapes"] >= 5


@pytest.mark.parametrize("kind", ["grain", "tfdata"])
def test_training_reports_split_documents_on_either_loader(tmp_path, kind, tiny_config):
  """The trainer's data stream (what becomes data_documents_split / data_chunks in the
  metrics) counts split documents on the tf.data loader as well as on grain."""
  import dataclasses

  from mm1_jax import train

  vocab = seqio.SentencePieceVocabulary(str(tokenizer.DEFAULT_SPM_PATH))
  rng = np.random.default_rng(2)
  task = _register(tmp_path, f"stream_{kind}", vocab, [(_document(rng, 3 * MAX_IMAGES, 30),
                                                         [20 + 30 * i for i in range(3 * MAX_IMAGES)])])
  model = dataclasses.replace(tiny_config, encoder=dataclasses.replace(tiny_config.encoder, image_size=SIZE,
                                                                       patch_size=8))
  assert model.tokens_per_image == Q
  cfg = pipeline.DataConfig(mixture_or_task_name=task, batch_size=1, seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                            pack=False, shuffle=False, module_imports=(), loader=kind)
  stream = train._DataStream(cfg, model, (0, 1), tmp_path / "run", 0, 0, {})
  for _ in range(3):
    next(stream)
  stats = stream.stats()
  assert stats["documents_split"] >= 1 and stats["chunks"] >= 3, stats
