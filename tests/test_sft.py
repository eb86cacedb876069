"""Supervised fine-tuning: conversations, the assistant-only loss mask, sub-images, SFT end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm1_jax.data import chat, highres, tokenizer
from mm1_jax.data.tokenizer import EOS_ID, IMAGE_ID

REPO = Path(__file__).resolve().parent.parent

TURNS = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "how many squares are there?"}, {"from": "gpt", "value": "2"}]


@pytest.fixture(scope="module")
def sp():
  return tokenizer.load()


def _trained_text(sp, ids, weights):
  """The text of the trained tokens, in runs: one string per maximal run of weight 1."""
  runs, cur = [], []
  for i, w in zip(ids.tolist(), weights.tolist()):
    if w:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  return [sp.decode([i for i in r if i != EOS_ID]) for r in runs]


def test_loss_mask_covers_the_assistant_replies_only(sp):
  ids, weights = chat.tokenize(sp, TURNS)
  assert ids[-1] == EOS_ID and weights[-1] == 1
  assert _trained_text(sp, ids, weights) == [" red\n", " 2\n"]
  # Everything the user said, the role prefixes and the image are untrained.
  untrained = sp.decode([i for i, w in zip(ids.tolist(), weights.tolist()) if not w])
  assert untrained == "user: <image>\nwhat colour is the circle?\nassistant:user: how many squares are there?\nassistant:"
  assert weights[ids == IMAGE_ID].sum() == 0
  # The same ids as tokenizing the rendered text in one go, so generation prompts match training.
  text, _ = chat.ChatTemplate().render(TURNS)
  assert ids[:-1].tolist() == sp.encode(text)
  prompt = chat.ChatTemplate().prompt(TURNS[:3])
  assert ids[:len(sp.encode(prompt))].tolist() == sp.encode(prompt)


def test_loss_mask_without_offsets_agrees(sp):
  class PlainVocab:  # only encode(): parts are tokenized one by one
    def encode(self, s):
      return sp.encode(s)

  ids, weights = chat.tokenize(PlainVocab(), TURNS, eos_id=EOS_ID)  # no eos_id of its own: passed
  ref_ids, ref_weights = chat.tokenize(sp, TURNS)
  assert ids.tolist() == ref_ids.tolist() and weights.tolist() == ref_weights.tolist()


@pytest.mark.parametrize("turns, message", [
    ([{"from": "human", "value": "hi"}], "no assistant turn"),
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "expected 'from'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "string 'value'"),
])
def test_bad_conversations_are_refused(sp, turns, message):
  with pytest.raises(chat.BadConversation, match=message):
    chat.tokenize(sp, turns)
  with pytest.raises(chat.BadConversation):
    chat.parse(b"{not json")


def _image(w, h, colour=(200, 30, 30)):
  im = Image.new("RGB", (w, h), colour)
  im.paste((10, 200, 10), (0, 0, w // 2, h // 2))  # top-left quarter green
  return im


def test_subimages_overview_and_crops():
  cfg = highres.SubImages(grid=(2, 2))
  out = highres.split(_image(128, 128), 64, cfg)
  assert out.shape == (5, 64, 64, 3) and out.dtype == np.uint8 and cfg.per_image == 5
  big = np.asarray(_image(128, 128))
  np.testing.assert_array_equal(out[1], big[:64, :64])  # crops at full resolution, row by row
  np.testing.assert_array_equal(out[4], big[64:, 64:])
  overview = np.asarray(_image(128, 128).resize((64, 64), Image.Resampling.BICUBIC, reducing_gap=None))
  np.testing.assert_array_equal(out[0], overview)
  assert highres.split(_image(128, 128), 64, highres.SubImages(grid=(1, 2), overview=False)).shape == (2, 64, 64, 3)


def test_subimages_pad_other_aspect_ratios_instead_of_cropping():
  cfg = highres.SubImages(grid=(2, 2))
  out = highres.split(_image(256, 128), 64, cfg)  # twice as wide as high: padded top and bottom
  pad = np.array(cfg.pad_value, np.uint8)
  # The top quarter of the top crops and the bottom quarter of the bottom ones are padding
  # (bicubic resampling blurs the few rows at the seam).
  np.testing.assert_array_equal(out[1][:28], np.broadcast_to(pad, (28, 64, 3)))
  np.testing.assert_array_equal(out[3][-28:], np.broadcast_to(pad, (28, 64, 3)))
  np.testing.assert_array_equal(out[0][:12], np.broadcast_to(pad, (12, 64, 3)))  # overview: square, padded
  assert (out[1][40, 10] == (10, 200, 10)).all()  # the image's green corner, not cut off
  assert (out[2][40, 60] == (200, 30, 30)).all()


def test_sft_data_masks_user_tokens_in_packed_batches():
  """The bundled chat task through the grain loader: loss on the answers, none on the questions."""
  from mm1_jax.data import loader, pipeline

  cfg = pipeline.DataConfig(mixture_or_task_name="mm1_shapes_chat", batch_size=2, seq_len=256, max_images=4,
                            num_threads=1)
  sp = tokenizer.load()
  batch = next(loader.make_loader(cfg, tokens_per_image=4, image_size=64))
  w, t = batch["loss_weights"], batch["targets"]
  assert w.sum() > 0 and (w[t == IMAGE_ID] == 0).all()
  for row in range(2):
    trained = sp.decode([int(x) for x in t[row][w[row] > 0] if x != EOS_ID])
    untrained = sp.decode([int(x) for x in t[row][(w[row] == 0) & (batch["segment_ids"][row] > 0)]
                           if x != IMAGE_ID])
    assert "user:" in untrained and "?" in untrained
    assert "user:" not in trained and "assistant" not in trained and "?" not in trained


def test_sft_data_with_subimages_takes_k_slots_per_image():
  from mm1_jax.data import loader, pipeline

  sub = highres.SubImages(grid=(2, 2))
  cfg = pipeline.DataConfig(mixture_or_task_name="mm1_shapes_chat", batch_size=2, seq_len=512, max_images=2,
                            num_threads=1, subimages=sub)
  batch = next(loader.make_loader(cfg, tokens_per_image=4, image_size=32))
  assert batch["images"].shape == (2, 2 * 5, 32, 32, 3)
  for row in range(2):
    n_slots = int((batch["images"][row].reshape(10, -1).max(axis=1) > 0).sum())
    assert n_slots % 5 == 0 and n_slots > 0
    assert (batch["tokens"][row] == IMAGE_ID).sum() == n_slots * 4  # K x Q placeholders per image


def test_llava_files_are_read_checked_and_built(tmp_path):
  from mm1_jax.data import build

  Image.new("RGB", (80, 64), (9, 9, 200)).save(tmp_path / "a.png")
  records = [
      {"id": "ok", "image": "a.png", "conversations": [
          {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A blue square."}]},
      {"id": "two", "image": ["a.png", "a.png"], "conversations": [
          {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes."}]},
      {"id": "textonly", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
      {"id": "missing", "image": "nope.png", "conversations": [
          {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
      {"id": "markers", "image": "a.png", "conversations": [
          {"from": "human", "value": "no marker"}, {"from": "gpt", "value": "y"}]},
      {"id": "noreply", "conversations": [{"from": "human", "value": "Hi"}]},
  ]
  (tmp_path / "llava.json").write_text(json.dumps(records))
  report = build.build("llava", tmp_path / "llava.json", tmp_path / "out", image_root=tmp_path)
  assert report["written"] == {"chat": 3}
  assert report["skipped"] == {"missing_file": 1, "bad_record": 2}
  from mm1_jax.data import loader, pipeline, sources
  from tasks import shapes

  assert report["tfds"]["name"] == "mm1_chat" and report["tfds"]["split"] == "train_llava"
  assert len(sources.corpus_source(tmp_path / "out", "chat").list_shards("train")) == report["tfds"]["shards"] >= 1
  # Registered as a task, read by the training loader: images in, loss on the replies only.
  sources.register_corpus("llavatest", tmp_path / "out", image_size=64, output_features=shapes.OUTPUT_FEATURES,
                          kinds=("chat",), rates={"chat": 1.0}, mixture="llavatest_sft")
  cfg = pipeline.DataConfig(mixture_or_task_name="llavatest_sft", batch_size=1, seq_len=128, max_images=2,
                            shuffle=False, pack=False, num_threads=1)
  rows = loader.make_loader(cfg, tokens_per_image=4, image_size=64)
  sp = tokenizer.load()
  replies = set()
  for _ in range(3):
    b = next(rows)
    replies.add(sp.decode([int(t) for t in b["targets"][0][b["loss_weights"][0] > 0] if t != EOS_ID]))
    assert (b["tokens"][0] == IMAGE_ID).sum() == 4 * int((b["images"][0].reshape(2, -1).max(1) > 0).sum())
  assert len(replies) == 3 and all(r.endswith(".\n") for r in replies)


@pytest.mark.slow
def test_sft_runs_end_to_end_from_a_pretraining_checkpoint(tmp_path):
  """gin/experiments/sft.gin end to end: a short pre-training run, then SFT from its checkpoint
  (parameters only: step 0, a new optimizer), trained on the answers only, and scored
  zero-shot with the chat template on the whole held-out VQA split (512 questions).
  (What SFT does to VQA accuracy is measured by benchmarks/sft_vqa.py; docs/results.md.)"""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  common = ["--gin.BATCH_SIZE=8", "--gin.LOG_EVERY=10", "--gin.train.train.progress=False"]
  pre = tmp_path / "pre"
  subprocess.run([sys.executable, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/quickstart.gin",
                  f"--workdir={pre}", "--gin.TRAIN_STEPS=30", "--gin.CHECKPOINT_EVERY=30", "--gin.EVALUATION=None",
                  *common], cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
  sft = tmp_path / "sft"
  proc = subprocess.run([sys.executable, "-m", "mm1_jax.cli", "train", "--gin_file=gin/experiments/sft.gin",
                         f"--workdir={sft}", f"--gin.INIT_FROM='{pre / 'checkpoints'}'", "--gin.TRAIN_STEPS=20",
                         "--gin.CHECKPOINT_EVERY=20", "--gin.fewshot.FewShotConfig.benchmarks=('shapes_vqa',)",
                         "--gin.fewshot.FewShotConfig.max_new_tokens=4", "--gin.fewshot.FewShotConfig.num_samples=None",
                         "--gin.fewshot.FewShotConfig.train_mixture=None",  # the corpus writer keeps eval images out
                         "--gin.train.train.eval_at_start=False", *common],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"initialised encoder from {pre / 'checkpoints'}" in proc.stdout
  records = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
  assert "resumed" not in proc.stdout and [r["step"] for r in records] == [10, 20]  # a fresh run from step 0
  for r in records:  # the loss counts the answers only: a small share of each 8 x 128 batch
    assert 0 < r["num_tokens"] < 0.4 * 8 * 128 and np.isfinite(r["loss"])
  result = json.loads((sft / "eval" / "step_20.json").read_text())
  assert result["info"]["shapes_vqa"]["test_examples"] == 512
  samples = json.loads((sft / "eval" / "step_20_samples.json").read_text())["shapes_vqa/0shot"]
  assert all("assistant" not in s["prediction"] and "user" not in s["prediction"] for s in samples)
  _check_vqa_scores(result["results"], samples)


def _check_vqa_scores(results: dict, samples: list[dict], key: str = "shapes_vqa/0shot"):
  """The written VQA scores against the test split they were computed on.

  Every shapes-world question has ten identical answers, so each question scores 0 or 1:
  each answer type's accuracy times its number of questions is a whole count, and the
  overall accuracy is those counts over all 512 questions (not the mean of the per-type
  accuracies: the types hold 275, 119 and 118 questions). The samples are the first test
  questions in order, with their own answers, all 512 of them. Catches per-type scores computed on the
  wrong questions or with misaligned predictions, an overall score that averages the
  types, questions left out of the scores (a num_queries limit still applied),
  and samples paired with another question's answers."""
  from mm1_jax.eval import fewshot, metrics

  test = fewshot.load_split("mm1_shapes_vqa_eval", "test")
  assert len(test) == 512 and all(len(set(q["answers"])) == 1 for q in test)
  counts = {}
  for q in test:
    counts[q["answer_type"]] = counts.get(q["answer_type"], 0) + 1
  per_type = {k.rsplit("/", 1)[1]: v for k, v in results.items() if k.startswith(f"{key}/accuracy/")}
  assert set(per_type) == set(counts)
  correct = {}
  for t, acc in per_type.items():
    correct[t] = round(acc * counts[t])
    assert acc == pytest.approx(correct[t] / counts[t], abs=1e-9), (t, acc, counts[t])
  assert results[f"{key}/accuracy"] == pytest.approx(sum(correct.values()) / len(test), abs=1e-9)
  # num_samples=None: every query's prediction, in test order, with its answer type; scored
  # again here, they give the written accuracies (a prediction paired with another question,
  # or a sample list cut short, does not).
  assert [s["id"] for s in samples] == [q["id"] for q in test] and len(samples) == 512
  again = {}
  for s, q in zip(samples, test):
    assert s["question"] == q["question"] and s["targets"] == q["answers"][:5]
    assert s["answer_type"] == q["answer_type"]
    hit = metrics.vqa_accuracy(s["prediction"], q["answers"])
    assert hit in (0.0, 1.0)
    again[q["answer_type"]] = again.get(q["answer_type"], 0) + int(hit)
  assert {t: again.get(t, 0) for t in correct} == correct


def test_pretrained_weights_start_a_higher_resolution_encoder(tmp_path, tiny_config):
  """64 px -> 128 px: the encoder's (and C-Abstractor's) position embeddings are interpolated
  bicubically to the larger patch grid; every other weight is taken as it is."""
  import dataclasses

  import jax
  import orbax.checkpoint as ocp

  from mm1_jax import model, pretrained, sharding, train, vit

  mesh = sharding.make_mesh(sharding.MeshConfig())
  low = tiny_config  # 64 px, patch 16: a 4x4 grid
  high = dataclasses.replace(low, encoder=dataclasses.replace(low.encoder, image_size=128))  # 8x8
  params, _ = train.init_param_shardings(model.MM1(low), train.dummy_batch(8, 16, 1, low), mesh,
                                         sharding.DECODER_RULES)
  rng = np.random.default_rng(0)
  source = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), params)
  ocp.PyTreeCheckpointer().save(tmp_path / "pre" / "params", source)
  abstract, shardings = train.init_param_shardings(model.MM1(high), train.dummy_batch(8, 16, 1, high), mesh,
                                                   sharding.DECODER_RULES)
  fresh = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  loaded = pretrained.load_pretrained(fresh, shardings, [str(tmp_path / "pre")], high)
  pos = np.asarray(loaded["encoder"]["pos_embed"])
  assert pos.shape[-2] == 64 and np.asarray(source["encoder"]["pos_embed"]).shape[-2] == 16
  np.testing.assert_allclose(pos, vit.resize_pos_embed(np.asarray(source["encoder"]["pos_embed"]), 8, 0),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(loaded["connector"]["pos_embed"]),
                             vit.resize_pos_embed(np.asarray(source["connector"]["pos_embed"]), 8, 0), rtol=1e-6)
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), b)  # noqa: E731
  jax.tree.map(same, loaded["decoder"], source["decoder"])


def test_chat_task_through_seqio_and_the_tfdata_pipeline():
  """The same mask from the seqio task's own preprocessors (tf.data path) as from the grain loader."""
  import seqio

  import tasks  # noqa: F401
  from mm1_jax.data import pipeline

  ex = next(seqio.get_mixture_or_task("mm1_shapes_chat").get_dataset(
      sequence_length=None, split="train", shuffle=False, num_epochs=1, use_cached=False).as_numpy_iterator())
  sp = tokenizer.load()
  assert ex["text"][-1] == EOS_ID and ex["weights"].shape == ex["text"].shape
  assert ex["images"].shape[0] == (ex["text"] == IMAGE_ID).sum()
  assert _trained_text(sp, ex["text"], ex["weights"])[0].startswith(" ")
  assert "?" not in "".join(_trained_text(sp, ex["text"], ex["weights"]))
  cfg = pipeline.DataConfig(mixture_or_task_name="mm1_shapes_chat", batch_size=2, seq_len=128, max_images=4,
                            loader="tfdata", shuffle=False)
  batch = next(pipeline.iterate(pipeline.make_dataset(cfg, tokens_per_image=4, image_size=64)))
  w, t = batch["loss_weights"], batch["targets"]
  trained = sp.decode([int(x) for x in t[0][w[0] > 0] if x != EOS_ID])
  assert trained and "user:" not in trained and "?" not in trained


def _foreground(image) -> int:
  """Pixels of an RGB image that belong to a shape (the background is light: every channel >= 225)."""
  return int((np.asarray(image).min(axis=-1) < 200).sum())


@pytest.mark.xdist_group("detail_corpus")
def test_detail_corpus_renders_the_64px_worlds_shapes_on_a_larger_canvas():
  """The detail VQA split: 128 px images whose shapes cover as many pixels as the 64 px
  world's (the mean over the 512 test images of each split), so downsizing them to a 64 px
  encoder input leaves a quarter of the pixels. Catches shapes scaled with the canvas
  (object_scale not passed on: four times the area), a detail task that reads the 64 px
  corpus, and detail questions that repeat the 64 px world's scenes."""
  import io

  import tasks  # noqa: F401  (registers the shapes-world tasks)
  from mm1_jax.eval import fewshot

  detail = fewshot.load_split("mm1_shapes_vqa_detail_eval", "test")
  plain = fewshot.load_split("mm1_shapes_vqa_eval", "test")
  assert len(detail) == len(plain) == 512
  sizes = {Image.open(io.BytesIO(q["image"])).size for q in detail}
  assert sizes == {(128, 128)}
  area = [np.mean([_foreground(Image.open(io.BytesIO(q["image"])).convert("RGB")) for q in split])
          for split in (detail, plain)]
  assert 0.75 < area[0] / area[1] < 1.33, area
  assert [q["question"] for q in detail[:64]] != [q["question"] for q in plain[:64]]  # its own stream


@pytest.mark.xdist_group("detail_corpus")
def test_detail_sft_crops_are_the_128px_image_itself():
  """mm1_shapes_detail_chat through the grain loader with 2x2 sub-images at 64 px: the four
  crops of the first conversation's image tile back to its 128 px record exactly (the crops
  are the image at full size, not an upsampled 64 px one), and the overview is that image
  downsized, with about a quarter of its shape pixels. Catches a detail task that reads the
  64 px corpus, a loader that decodes to the encoder's size before cutting, and a mixture
  that does not reach the detail conversations."""
  import io

  import seqio

  import tasks  # noqa: F401  (registers the shapes-world tasks)
  from mm1_jax.data import loader, pipeline

  assert {t.name for t in seqio.get_mixture_or_task("mm1_shapes_detail_sft").tasks} == {
      "mm1_shapes_detail_chat", "mm1_shapes_text"}
  import tensorflow as tf

  source_records = seqio.get_mixture_or_task("mm1_shapes_detail_chat").source.random_access("train")
  record = tf.train.Example.FromString(source_records[0])
  png = record.features.feature["images"].bytes_list.value[0]
  source = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  assert source.shape == (128, 128, 3)
  sub = highres.SubImages(grid=(2, 2))
  cfg = pipeline.DataConfig(mixture_or_task_name="mm1_shapes_detail_chat", batch_size=1, seq_len=512, max_images=2,
                            num_threads=1, subimages=sub, pack=False, shuffle=False)
  slots = next(loader.make_loader(cfg, tokens_per_image=4, image_size=64))["images"][0][:5]
  tiled = np.concatenate([np.concatenate([slots[1], slots[2]], 1), np.concatenate([slots[3], slots[4]], 1)], 0)
  np.testing.assert_array_equal(tiled, source)
  assert 2.5 < _foreground(source) / _foreground(slots[0]) < 6
