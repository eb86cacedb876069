"""The generated corpus, the tokenizer, every seqio task and the batch pipeline."""

import collections
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the tasks)
from mm1_jax.data import corpus, loader, pipeline, preprocessors, shapes_world, sources, tokenizer
from mm1_jax.data.tokenizer import EOS_ID, IMAGE_ID, PAD_ID


@pytest.fixture(scope="module")
def data_dir():
  return corpus.ensure_corpus(spec=tasks.shapes.CORPUS_SPEC, progress=False)


LOADERS = ["grain", "tfdata"]


def _batches(cfg, **kw):
  """Batches from the loader cfg.loader names: the grain loader or the tf.data pipeline."""
  if cfg.loader == "grain":
    return loader.make_loader(cfg, **kw)
  return pipeline.iterate(pipeline.make_dataset(cfg, **kw))


def test_generation_is_deterministic():
  a = shapes_world.caption_example(0, 5)
  b = shapes_world.caption_example(0, 5)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"]
  assert not np.array_equal(a["image"], shapes_world.caption_example(0, 6)["image"])


def test_captions_and_answers_are_true_to_the_scene():
  rng = np.random.default_rng(1)
  for _ in range(50):
    scene = shapes_world.sample_scene(rng)
    assert 1 <= len(scene) <= 4
    for q, a in shapes_world.questions(scene, rng):
      if q.startswith("how many"):
        kind = q.split()[2][:-1]
        assert int(a) == sum(s.kind == kind for s in scene)
      elif q.startswith("what colour"):
        kind = q.split()[-1][:-1]
        assert [s.colour for s in scene if s.kind == kind] == [a]
    desc = shapes_world.describe(scene)
    for s in scene:
      assert s.colour in desc and s.kind in desc


def test_tokenizer_special_ids_and_round_trip():
  sp = tokenizer.load()
  assert sp.pad_id() == PAD_ID and sp.eos_id() == EOS_ID
  text = "<image>a red circle.\nQuestion: how many squares are there? Answer: 2\n"
  ids = sp.encode(text)
  assert ids[0] == IMAGE_ID and ids.count(tokenizer.NEWLINE_ID) == 2
  assert sp.decode(ids) == text
  assert sp.get_piece_size() <= 256  # fits the tiny model's vocabulary


def test_corpus_manifest_and_no_eval_image_in_training(data_dir):
  manifest = json.loads((data_dir / "manifest.json").read_text())
  spec = tasks.shapes.CORPUS_SPEC
  assert manifest["counts"]["caption/train"] == spec.num_caption
  assert manifest["counts"]["vqa_eval/test"] == spec.num_eval_test

  def digests(what, key):
    """Image digests of a training kind's records (read as the loaders read them) or of
    the eval TFRecord files a glob names."""
    if what in sources.KINDS:
      source = sources.corpus_source(data_dir, what).random_access("train")
      records = [source[i] for i in range(len(source))]
    else:
      files = sorted(map(str, data_dir.glob(what)))
      records = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    assert records, what
    out = set()
    for rec in records:
      feats = tf.train.Example.FromString(rec).features.feature[key].bytes_list.value
      out.update(hashlib.sha1(b).hexdigest() for b in feats)
    return out

  train = digests("caption", "image") | digests("interleaved", "images")
  evals = digests("caption_eval/*", "image") | digests("vqa_eval/*", "image")
  assert len(evals) > 300 and not (train & evals)


@pytest.mark.parametrize("task_name, min_images, max_images", [
    ("mm1_shapes_caption", 1, 1),
    ("mm1_shapes_interleaved", 2, 3),
    ("mm1_shapes_text", 0, 0),
])
def test_pretrain_task_features(data_dir, task_name, min_images, max_images):
  task = seqio.get_mixture_or_task(task_name)
  for ex in task.get_dataset(sequence_length=None, split="train", shuffle=False).take(20).as_numpy_iterator():
    assert ex["text"].dtype == np.int32 and ex["text"][-1] == EOS_ID
    n_markers = int((ex["text"] == IMAGE_ID).sum())
    assert ex["images"].dtype == np.uint8 and ex["images"].shape[1:] == (64, 64, 3)
    assert n_markers == ex["images"].shape[0]
    assert min_images <= n_markers <= max_images


@pytest.mark.parametrize("task_name, keys", [
    ("mm1_shapes_caption_eval", {"id", "image", "caption", "references"}),
    ("mm1_shapes_vqa_eval", {"id", "image", "question", "answers", "answer_type"}),
    ("mm1_shapes_text_eval", {"id", "text"}),
    ("mm1_shapes_textqa_eval", {"id", "question", "answers", "answer_type"}),
])
def test_eval_task_features(data_dir, task_name, keys):
  ds = seqio.get_mixture_or_task(task_name).get_dataset(sequence_length=None, split="test",
                                                         shuffle=False, num_epochs=1)
  ex = next(ds.as_numpy_iterator())
  assert keys <= set(ex)


def test_mixture_rates_registered():
  mix = seqio.get_mixture_or_task("mm1_shapes_pretrain")
  rates = {t.name: mix.get_rate(t) for t in mix.tasks}
  assert rates == {"mm1_shapes_interleaved": 45.0, "mm1_shapes_caption": 45.0, "mm1_shapes_text": 10.0}


def _truncate(tokens, max_len, q, max_images):
  n = int((np.asarray(tokens) == IMAGE_ID).sum())
  ex = {"text": tf.constant(tokens, tf.int32), "images": tf.zeros([n, 8, 8, 3], tf.uint8)}
  out = preprocessors.truncate_and_expand_images(ex, max_len, q, max_images, image_size=8, image_id=IMAGE_ID)
  return out["text"].numpy().tolist(), out["images"].shape[0]


def test_truncation_never_splits_an_image():
  I = IMAGE_ID  # noqa: E741
  toks = [10, I, 11, 12, I, 13, EOS_ID]
  # Enough room: each image becomes 4 ids.
  text, n = _truncate(toks, 100, 4, 8)
  assert text == [10, I, I, I, I, 11, 12, I, I, I, I, 13, EOS_ID] and n == 2
  # 9 ids: the second image would be cut, so it and everything after it goes.
  text, n = _truncate(toks, 9, 4, 8)
  assert text == [10, I, I, I, I, 11, 12] and n == 1
  # Image budget of 1 drops the second image even with room to spare.
  text, n = _truncate(toks, 100, 4, 1)
  assert text == [10, I, I, I, I, 11, 12] and n == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_pipeline_batches(data_dir, kind):
  cfg = pipeline.DataConfig(batch_size=4, seq_len=64, max_images=2, seed=3, loader=kind)
  batch = next(_batches(cfg, tokens_per_image=4, image_size=32))
  assert batch["tokens"].shape == (4, 64) and batch["images"].shape == (4, 2, 32, 32, 3)
  for i in range(4):
    seg = batch["segment_ids"][i]
    # Targets are inputs shifted by one within each example; no loss on image placeholders or padding.
    for s in range(1, seg.max() + 1):
      at = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(batch["targets"][i, at[:-1]], batch["tokens"][i, at[1:]])
    w = batch["loss_weights"][i]
    assert not w[batch["targets"][i] == IMAGE_ID].any() and not w[batch["targets"][i] == PAD_ID].any()
    assert w.sum() > 0
    assert (batch["tokens"][i] == IMAGE_ID).sum() % 4 == 0
    n_img = (batch["tokens"][i] == IMAGE_ID).sum() // 4
    assert (batch["images"][i, n_img:] == 0).all()
    if n_img:
      assert batch["images"][i, :n_img].max() > 0


@pytest.mark.parametrize("rows", [1, 4])
def test_grain_loader_is_deterministic_and_resumes_from_its_state(data_dir, rows):
  """Same seed, same batches; a loader restored from a saved state continues exactly (with
  4 open rows: rebuilt by replaying their examples)."""
  cfg = pipeline.DataConfig(batch_size=4, seq_len=48, max_images=2, seed=7, pack_rows=rows)
  kw = dict(tokens_per_image=4, image_size=64)
  it = loader.make_loader(cfg, **kw)
  head = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  # The replay of the open rows stays bounded: the age limit, or one row's examples.
  assert len(state.get("slots", [])) <= (32 * rows + 1 if rows > 1 else cfg.seq_len)
  tail = [next(it) for _ in range(4)]
  fresh = loader.make_loader(cfg, **kw)
  np.testing.assert_array_equal(next(fresh)["tokens"], head[0]["tokens"])
  resumed = loader.make_loader(cfg, **kw)
  resumed.set_state(state)
  for want in tail:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  other_seed = loader.make_loader(dataclasses.replace(cfg, seed=8), **kw)
  assert not np.array_equal(next(other_seed)["tokens"], head[0]["tokens"])


def test_grain_loader_hosts_read_disjoint_shares(data_dir):
  """Each host reads every n-th record of each task: no example is seen by two hosts."""
  cfg = pipeline.DataConfig(mixture_or_task_name="mm1_shapes_text", batch_size=4, seq_len=256,
                            max_images=1, pack=False, shuffle=False)
  seen = []
  for host in range(2):
    it = loader.make_loader(cfg, tokens_per_image=4, image_size=64, shard_index=host, num_shards=2,
                            num_epochs=1)
    seen.append({tuple(row[row != PAD_ID]) for b in it for row in b["tokens"]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.slow
def test_tfdata_pipeline_is_deterministic_and_resumes(data_dir):
  cfg = pipeline.DataConfig(batch_size=2, seq_len=48, max_images=2, seed=7, loader="tfdata")
  kw = dict(tokens_per_image=4, image_size=64)
  it = pipeline.iterate(pipeline.make_dataset(cfg, **kw))
  first = [next(it) for _ in range(4)]
  resumed = next(pipeline.iterate(pipeline.make_dataset(cfg, start_batch=3, **kw)))
  np.testing.assert_array_equal(first[3]["tokens"], resumed["tokens"])
  np.testing.assert_array_equal(first[3]["images"], resumed["images"])


@pytest.mark.parametrize("kind", LOADERS)
def test_mixture_rate_override_changes_sampling(data_dir, kind):
  rates = {"mm1_shapes_text": 1.0, "mm1_shapes_caption": 0.0, "mm1_shapes_interleaved": 0.0}
  cfg = pipeline.DataConfig(batch_size=8, seq_len=64, max_images=3, seed=0, mixture_rates=rates, loader=kind)
  batch = next(_batches(cfg, tokens_per_image=4, image_size=64))
  assert not (batch["tokens"] == IMAGE_ID).any()  # text-only


def test_mixture_rate_override_must_match_the_mixture():
  cfg = pipeline.DataConfig(mixture_rates={"mm1_shapes_text": 1.0})
  with pytest.raises(ValueError, match="exactly the tasks"):
    pipeline.get_mixture_or_task(cfg)


@pytest.mark.parametrize("kind", LOADERS)
def test_user_module_registers_a_mixture(tmp_path, monkeypatch, kind):
  """The tutorial in docs/data.md: a mixture registered in the user's own module."""
  (tmp_path / "my_mixtures.py").write_text(
      "import seqio\nimport tasks\n"
      "seqio.MixtureRegistry.add('my_captions_and_text', "
      "[('mm1_shapes_caption', 3.0), ('mm1_shapes_text', 1.0)])\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = pipeline.DataConfig(mixture_or_task_name="my_captions_and_text", batch_size=4, seq_len=64,
                            max_images=1, module_imports=("tasks", "my_mixtures"), loader=kind)
  batch = next(_batches(cfg, tokens_per_image=4, image_size=64))
  assert batch["tokens"].shape == (4, 64)


def test_packing_keeps_examples_apart():
  I = IMAGE_ID  # noqa: E741
  img = lambda v: np.full((1, 8, 8, 3), v, np.uint8)  # noqa: E731
  none = np.zeros((0, 8, 8, 3), np.uint8)
  examples = [
      {"text": np.array([I, I, 10, EOS_ID]), "images": img(1)},
      {"text": np.array([11, 12, EOS_ID]), "images": none},
      {"text": np.array([I, I, 13, 14, EOS_ID]), "images": img(2)},  # 4 pairs: does not fit in 8
  ]
  rows = list(pipeline.pack_examples(examples, seq_len=8, max_images=2, image_size=8, image_id=I, pad_id=PAD_ID))
  assert len(rows) == 2
  r = rows[0]
  np.testing.assert_array_equal(r["tokens"], [I, I, 10, 11, 12, PAD_ID, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(r["targets"], [I, 10, EOS_ID, 12, EOS_ID, PAD_ID, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(r["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(r["loss_weights"], [0, 1, 1, 1, 1, 0, 0, 0])
  assert r["images"][0].max() == 1 and r["images"][1].max() == 0
  assert rows[1]["images"][0].max() == 2 and rows[1]["segment_ids"].max() == 1
  unpacked = list(pipeline.pack_examples(examples, seq_len=8, max_images=2, image_size=8, pack=False, image_id=I,
                                       pad_id=PAD_ID))
  assert len(unpacked) == 3


def _example(pairs: int, images: int = 0, first: int = 10) -> dict:
  """An example of `pairs` (input, target) pairs; its images (value first + k) lead it."""
  text = np.concatenate([[IMAGE_ID] * images, np.arange(first, first + pairs + 1 - images)]).astype(np.int32)
  return {"text": text, "images": np.stack([np.full((8, 8, 3), (first + k) % 256, np.uint8) for k in range(images)])
          if images else np.zeros((0, 8, 8, 3), np.uint8)}


def _segments(rows) -> list[tuple[int, ...]]:
  """Every example's input ids, as packed, sorted."""
  out = []
  for r in rows:
    for s in range(1, r["segment_ids"].max() + 1):
      out.append(tuple(r["tokens"][r["segment_ids"] == s]))
  return sorted(out)


def test_first_fit_packing_fills_the_gaps_next_fit_leaves():
  """Catches a packer that pads a gap a later example fills (or overfills a row): next-fit
  emits a 6-pair row with 2 positions free when the next example has 6 pairs; with two
  open rows the 2-pair examples after fill both rows. Image slots are a budget of their own:
  the third one-image example goes to the second row."""
  ex = [_example(6, first=10), _example(6, first=20), _example(2, first=30), _example(2, first=40)]
  kw = dict(seq_len=8, max_images=2, image_size=8, image_id=IMAGE_ID, pad_id=PAD_ID)
  next_fit = list(pipeline.pack_examples(ex, **kw))
  first_fit = list(pipeline.pack_examples(ex, rows=2, **kw))
  assert [int((r["segment_ids"] > 0).sum()) for r in next_fit] == [6, 8, 2]
  assert [int((r["segment_ids"] > 0).sum()) for r in first_fit] == [8, 8]
  assert _segments(first_fit) == _segments(next_fit)
  np.testing.assert_array_equal(first_fit[0]["segment_ids"], [1] * 6 + [2] * 2)
  imgs = [_example(2, images=1, first=50 + 10 * k) for k in range(3)]
  rows = list(pipeline.pack_examples(imgs, rows=2, **kw))
  assert [int((r["images"].reshape(2, -1).max(1) > 0).sum()) for r in rows] == [2, 1]
  assert rows[1]["images"][0].max() == 70  # the third example's image, in its row's first slot


def test_first_fit_packing_keeps_every_example_once_and_pads_less():
  """Catches a packer that drops, duplicates or splits an example: random examples, packed
  by 1 (next-fit), 4 and 16 open rows, come out as the same examples, in no more rows."""
  rng = np.random.default_rng(0)
  ex = [_example(int(rng.integers(1, 15)), int(rng.integers(0, 3)), first=100 + 20 * i) for i in range(300)]
  kw = dict(seq_len=16, max_images=3, image_size=8, image_id=IMAGE_ID, pad_id=PAD_ID)
  packed = {k: list(pipeline.pack_examples(ex, rows=k, **kw)) for k in (1, 4, 16)}
  want = sorted(tuple(e["text"][:-1]) for e in ex)
  for k, rows in packed.items():
    assert _segments(rows) == want, k
  assert len(packed[16]) <= len(packed[4]) < len(packed[1])


def test_packing_emits_a_row_open_too_long():
  """Catches a row that stays open forever (a checkpoint's replay would grow without
  bound): a 7-pair row with one position left that no later 4-pair example fits is never
  the fullest, so only the age limit emits it, after max_age more examples."""
  kw = dict(seq_len=8, max_images=1, image_size=8, image_id=IMAGE_ID, pad_id=PAD_ID)
  ex = [_example(7, first=10)] + [_example(4, first=100 + 10 * i) for i in range(20)]

  def rank_of_first_row(max_age):
    packer = pipeline.Packer(rows=2, max_age=max_age, **kw)
    order = []
    for e in ex:
      late = packer.overdue()
      if late is not None:
        order.append(packer.take(late))
      order.append(packer.place(e["text"], e["images"])[1])
    order = [r for r in order if r is not None] + list(packer.flush())
    return next(i for i, r in enumerate(order) if r["tokens"][0] == 10)

  assert rank_of_first_row(None) > 5  # the default limit (64 examples) never reached here
  assert rank_of_first_row(4) <= 2


def test_grain_packing_resumes_exactly_through_repeated_checkpoints():
  """Catches a restored packer whose open rows, their ages or its record of emitted rows
  differ from the uninterrupted one's: from every row's state, restored, advanced two rows,
  saved and restored again, the rows that follow are the uninterrupted rows. The examples
  (several a record, as a long document's) make rows that outlive others and rows that
  only the age limit emits."""
  import grain

  rng = np.random.default_rng(3)
  records, n = [], 0
  for i in range(30):
    if i % 7 == 3:
      records.append(loader.Skipped("bad"))
    record = []
    for _ in range(int(rng.integers(1, 4))):
      record.append(_example(int(rng.choice([7, 4, 3, 2])), int(rng.integers(0, 2)), first=10 + 10 * n))
      n += 1
    records.append(record)
  records += [loader.Skipped("bad"), loader.Skipped("late")]  # read only at the end of the data
  counters = []

  def rows(pack_rows=3):
    skipped = collections.Counter()
    counters.append(skipped)
    ds = loader._pack_iter_dataset(grain.MapDataset.source(records).to_iter_dataset(), 8, 1, 8, True, skipped,
                                   collections.Counter(), image_id=IMAGE_ID, pad_id=PAD_ID, rows=pack_rows,
                                   max_age=4)
    return iter(ds)

  want = list(rows())
  assert counters[-1] == {"bad": 5, "late": 1}
  assert _segments(want) == sorted(tuple(e["text"][:-1]) for r in records if isinstance(r, list) for e in r)
  saw_closed = False
  for k in range(len(want) - 2):
    it = rows()
    for _ in range(k):
      next(it)
    again = rows()
    again.set_state(json.loads(json.dumps(it.get_state())))
    next(again), next(again)
    state = json.loads(json.dumps(again.get_state()))
    saw_closed |= -1 in state.get("slots", [])
    last = rows()
    last.set_state(state)
    got = list(last)
    assert len(got) == len(want) - k - 2, k
    for g, w in zip(got, want[k + 2:]):
      for key in w:
        np.testing.assert_array_equal(g[key], w[key], err_msg=f"after {k} + 2 rows: {key}")
    assert counters[-1] == {"bad": 5, "late": 1}, k  # each skipped record counted once
  assert saw_closed  # some states replayed past rows already emitted
  with pytest.raises(ValueError, match="pack_rows=3"):
    rows(pack_rows=2).set_state(state)


@pytest.mark.parametrize("kind", LOADERS)
def test_packed_batches_never_attend_across_examples(data_dir, kind):
  """No token of a packed row can see a token of another example."""
  from mm1_jax.model import segment_causal_mask
  cfg = pipeline.DataConfig(batch_size=4, seq_len=128, max_images=4, seed=1, loader=kind)
  batch = next(_batches(cfg, tokens_per_image=16, image_size=64))
  assert batch["segment_ids"].max() > 1  # something was packed
  mask = np.asarray(segment_causal_mask(batch["segment_ids"]))[:, 0]
  seg = batch["segment_ids"]
  cross = (seg[:, :, None] != seg[:, None, :]) & ~np.eye(128, dtype=bool)[None]
  assert not (mask & cross).any()
  # The image slots are filled in the order of the placeholders, one slot per 16 ids.
  for i in range(4):
    assert (batch["tokens"][i] == IMAGE_ID).sum() // 16 == (batch["images"][i].reshape(4, -1).max(1) > 0).sum()


def test_grain_loader_skips_and_counts_bad_records(tmp_path):
  """Records that would break training are skipped, counted by reason, and never stop it."""
  import io

  from PIL import Image

  def png(v):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (v, v, v)).save(buf, format="PNG")
    return buf.getvalue()

  good = [{"id": f"g{i}", "image": png(i * 10), "caption": f"a red circle {i}"} for i in range(6)]
  bad = [{"id": "b0", "image": png(5)[:30], "caption": "corrupt image"},
         {"id": "b1", "image": png(7), "caption": "   "},
         {"id": "b2", "image": png(9), "caption": "two markers <image> in a caption"}]
  shards = corpus.ShardWriter(tmp_path / "caption", "train-raw", 1)  # written without the build checks
  for rec in good[:3] + bad + good[3:]:
    shards.write(corpus.tf_example(rec))
  shards.close()
  sources.register_corpus("badtest", tmp_path, image_size=32, output_features=tasks.shapes.OUTPUT_FEATURES,
                          kinds=("caption",), rates={"caption": 1.0})
  cfg = pipeline.DataConfig(mixture_or_task_name="badtest_caption", batch_size=2, seq_len=64, max_images=2,
                            pack=False, shuffle=False, module_imports=())
  it = loader.make_loader(cfg, tokens_per_image=4, image_size=32, num_epochs=1)
  batches = list(it)
  assert sum(b["tokens"].shape[0] for b in batches) == 6  # every good record, in 3 batches
  assert it.skipped() == {"corrupt_image": 1, "empty_text": 1, "image_count_mismatch": 1}
  assert it.get_state()["skipped"] == it.skipped()


def test_mm1_data_inspect_reports_rates_lengths_and_a_preview(data_dir, tmp_path, capsys):
  from mm1_jax.data import build

  assert build.main(["inspect", "--mixture=mm1_shapes_pretrain", "--n=80", f"--out={tmp_path}",
                     "--seq_len=96", "--max_images=3"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["examples"] == 80 and report["skipped"] == {}
  for task, rate in {"mm1_shapes_caption": 0.45, "mm1_shapes_interleaved": 0.45, "mm1_shapes_text": 0.1}.items():
    assert report["rates"][task]["configured"] == pytest.approx(rate)
    assert abs(report["rates"][task]["sampled"] - rate) < 0.05
  assert 0 < report["padding_fraction"] < 1 and report["images_per_sequence"] > 0
  # Token shares by kind: interleaved documents (2-3 images) are longer than caption pairs
  # (1 image), so at equal record rates they fill more of the sequences.
  shares = report["token_shares_by_kind"]
  assert set(shares) == {"caption", "interleaved", "text"} and sum(shares.values()) == pytest.approx(1.0)
  assert shares["interleaved"] > shares["caption"] > 0
  assert report["token_shares"]["mm1_shapes_text"]["kind"] == "text"
  page = (tmp_path / "preview.html").read_text()
  assert page.count("<img") >= 10 and "&lt;image&gt;" in page
