"""The eight MM1 benchmarks in their official annotation formats -> seqio tasks -> few-shot
evaluation, with the held-out check against a training corpus.

The files are small, written here in each benchmark's shipped layout and format, with
malformed entries of each kind and one test image missing on disk."""

import io
import json
import tarfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mm1_jax import sharding
from mm1_jax.eval import fewshot
from mm1_jax.eval import readers
from mm1_jax.model import MM1

N = 6  # usable entries per split


def _png(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, bytes):
    path.write_bytes(data)
  else:
    path.write_text(json.dumps(data))


def _coco(root):
  d = root / "coco"
  images = []
  for i in range(2 * N):
    split, folder = ("train", "train2014") if i < N else ("test", "val2014")
    name = f"COCO_{folder}_{i:012d}.jpg"
    _write(d / "images" / folder / name, _png(i))
    images.append({"filepath": folder, "filename": name, "imgid": i, "cocoid": 1000 + i, "split": split,
                   "sentences": [{"raw": f"Caption {j} of image {i}.", "tokens": []} for j in range(5)]})
  images.append({"filepath": "val2014", "filename": "x.jpg", "cocoid": 99, "split": "test", "sentences": []})
  images.append({"filepath": "val2014", "filename": "y.jpg", "cocoid": 98, "split": "val",
                 "sentences": [{"raw": "the val split is neither support nor test"}]})
  _write(d / "dataset_coco.json", {"images": images, "dataset": "coco"})


def _nocaps(root):
  d = root / "nocaps"
  imgs = [{"id": i, "file_name": f"{i:04x}.jpg", "open_images_id": f"oi{i}"} for i in range(N + 1)]
  anns = [{"image_id": i, "id": 10 * i + j, "caption": f"nocaps {j} for {i}"} for i in range(N) for j in range(3)]
  for i in range(N):
    _write(d / "images" / f"{i:04x}.jpg", _png(100 + i))
  _write(d / "nocaps_val_4500_captions.json", {"images": imgs, "annotations": anns})  # image N: no captions


def _textcaps(root):
  d = root / "textcaps"
  for split, offset in (("train", 200), ("val", 300)):
    data = []
    for i in range(N):
      image_id = f"{offset + i:016x}"
      _write(d / "images" / split / f"{image_id}.jpg", _png(offset + i))
      refs = [f"a sign that says {offset + i} version {j}" for j in range(5)]
      data += [{"image_id": image_id, "image_path": f"{split}/{image_id}.jpg", "caption_str": r,
                "reference_strs": refs} for r in refs]  # one entry per caption, as shipped
    data.append({"image_id": "", "caption_str": "no image id"})
    _write(d / f"TextCaps_0.1_{split}.json", {"dataset_type": split, "data": data})


def _vqa(root, name, qfile, afile):
  d = root / name
  for subtype, offset in (("train2014", 400), ("val2014", 500)):
    questions, annotations = [], []
    for i in range(N):
      image_id = offset + i // 2  # two questions per image
      _write(d / "images" / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", _png(image_id))
      qid = image_id * 10 + i % 2
      questions.append({"image_id": image_id, "question": f"How many things in {qid}?", "question_id": qid})
      annotations.append({"question_id": qid, "image_id": image_id, "answer_type": "number",
                          "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": k + 1}
                                      for k in range(10)]})
    questions.append({"image_id": offset, "question": "an unannotated question", "question_id": 1})
    _write(d / qfile.format(subtype), {"data_subtype": subtype, "task_type": "Open-Ended", "questions": questions})
    _write(d / afile.format(subtype), {"data_subtype": subtype, "annotations": annotations})


def _textvqa(root):
  d = root / "textvqa"
  for split, offset in (("train", 600), ("val", 700)):
    data = []
    for i in range(N):
      image_id = f"{offset + i:016x}"
      _write(d / "train_images" / f"{image_id}.jpg", _png(offset + i))
      data.append({"question": f"what does the sign {i} say?", "image_id": image_id, "question_id": offset + i,
                   "answers": ["stop"] * 10, "set_name": split})
    data.append({"question": "no answers", "image_id": "ab", "question_id": 1, "answers": []})
    _write(d / f"TextVQA_0.5.1_{split}.json", {"dataset_name": "textvqa", "data": data})


def _vizwiz(root):
  d = root / "vizwiz"
  for split, offset in (("train", 800), ("val", 900)):
    entries = []
    for i in range(N):
      name = f"VizWiz_{split}_{i:08d}.jpg"
      _write(d / split / name, _png(offset + i))
      entries.append({"image": name, "question": "What is this?", "answerable": 1, "answer_type": "other",
                      "answers": [{"answer": "a can", "answer_confidence": "yes"}] * 10})
    entries.append({"image": "VizWiz_x.jpg", "question": "", "answers": []})
    _write(d / "annotations" / f"{split}.json", entries)


def _gqa(root):
  d = root / "gqa"
  for fname, offset in (("train_balanced_questions.json", 1000), ("testdev_balanced_questions.json", 1100)):
    qs = {}
    for i in range(N):
      image_id = f"n{offset + i}"
      _write(d / "images" / f"{image_id}.jpg", _png(offset + i))
      qs[f"{offset + i}"] = {"imageId": image_id, "question": "Is the cup on the left?", "answer": "yes",
                             "fullAnswer": "Yes, the cup is on the left.", "types": {}}
    qs["bad"] = {"imageId": "n0", "question": "missing answer"}
    _write(d / fname, qs)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_data")
  _coco(root)
  _nocaps(root)
  _textcaps(root)
  _vqa(root, "vqav2", "v2_OpenEnded_mscoco_{}_questions.json", "v2_mscoco_{}_annotations.json")
  _vqa(root, "okvqa", "OpenEnded_mscoco_{}_questions.json", "mscoco_{}_annotations.json")
  _textvqa(root)
  _vizwiz(root)
  _gqa(root)
  # One test image (two questions) missing on disk: skipped and counted, not fatal.
  (root / "vqav2" / "images" / "val2014" / "COCO_val2014_000000000500.jpg").unlink()
  readers.configure(str(root))
  yield root
  readers.configure(None)


OFFICIAL = ("coco", "nocaps", "textcaps", "vqav2", "textvqa", "vizwiz", "okvqa", "gqa")
SKIPPED = {"coco": 1, "nocaps": 1, "textcaps": 1, "vqav2": 1, "textvqa": 1, "vizwiz": 1, "okvqa": 1, "gqa": 1}


@pytest.mark.parametrize("name", OFFICIAL)
def test_readers_parse_the_official_files(eval_root, name):
  test, skipped = readers.read(name, "test")
  assert len(test) == N and skipped == SKIPPED[name]
  kind = readers.get(name).kind
  for rec in test:
    assert rec["image_path"].startswith(str(eval_root / name))
    if kind == "caption":
      assert rec["references"] and rec["caption"] == rec["references"][0]
    else:
      assert rec["question"] and rec["answers"]
  assert len({r["id"] for r in test}) == N
  if "support" in readers.LAYOUTS[name]:
    support, _ = readers.read(name, "support")
    assert len(support) == N and not {r["image_id"] for r in support} & {r["image_id"] for r in test}


def test_reader_details(eval_root):
  coco, _ = readers.read("coco", "test")
  assert coco[0]["id"] == "1006" and len(coco[0]["references"]) == 5
  assert coco[0]["image_path"].endswith("images/val2014/COCO_val2014_000000000006.jpg")
  textcaps, _ = readers.read("textcaps", "test")  # 5 entries per image grouped into one
  assert len(textcaps[0]["references"]) == 5
  vqa, _ = readers.read("vqav2", "test")
  assert vqa[0]["answers"] == ["2"] * 10 and vqa[0]["image_id"] == "500" == vqa[1]["image_id"]
  assert vqa[0]["answer_type"] == "number"  # from the annotation, for the per-type breakdown
  gqa, _ = readers.read("gqa", "test")
  assert gqa[0]["answers"] == ["yes"] and gqa[0]["image_path"].endswith("images/n1100.jpg")


def test_missing_files_and_names_are_clear_errors(eval_root, tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark 'cocoo'"):
    readers.get("cocoo")
  readers.configure(str(tmp_path))
  try:
    with pytest.raises(FileNotFoundError, match=r"coco test annotations: .*--data_root.*coco.test.annotations"):
      readers.read("coco", "test")
    # One file pointed elsewhere by its override key.
    readers.configure(str(tmp_path), {"coco.test.annotations": str(eval_root / "coco" / "dataset_coco.json"),
                                         "coco.test.images": str(eval_root / "coco" / "images")})
    assert len(readers.read("coco", "test")[0]) == N
  finally:
    readers.configure(str(eval_root))
  bad = tmp_path / "gqa" / "testdev_balanced_questions.json"
  bad.parent.mkdir()
  bad.write_text("{not json")
  (tmp_path / "gqa" / "images").mkdir()
  readers.configure(str(tmp_path))
  try:
    with pytest.raises(ValueError, match="not valid JSON"):
      readers.read("gqa", "test")
  finally:
    readers.configure(str(eval_root))


def test_seqio_tasks_serve_the_benchmarks(eval_root):
  import seqio

  import tasks  # noqa: F401
  from mm1_jax.eval import metrics

  task = seqio.get_mixture_or_task("mm1_eval_vqav2")
  assert task.predict_metric_fns == [metrics.vqa_metric]
  assert seqio.get_mixture_or_task("mm1_eval_gqa").predict_metric_fns == [metrics.exact_match_metric]
  records = fewshot.load_split("mm1_eval_vqav2", "test")
  assert len(records) == N and records[0]["answers"] == ["2"] * 10 and "image" not in records[0]
  assert records[0]["question"].startswith("How many things")


def _train_corpus_with(tmp_path, image_bytes):
  """A webdataset caption corpus holding one eval image, built and registered as a mixture."""
  import seqio

  from mm1_jax.data import build, sources
  from tasks import shapes

  src = tmp_path / "wds"
  src.mkdir()
  with tarfile.open(src / "shard-0.tar", "w") as tar:
    for key, data, text in (("k0", image_bytes, "a leaked eval image"), ("k1", _png(5000), "an unrelated one")):
      for name, payload in ((f"{key}.png", data), (f"{key}.txt", text.encode())):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  build.build("webdataset", src, tmp_path / "corpus", progress=False, num_shards=1)
  sources.register_corpus("leaky", tmp_path / "corpus", image_size=64, output_features=shapes.OUTPUT_FEATURES,
                          kinds=("caption",), rates={"caption": 1.0})
  assert "leaky_pretrain" in seqio.MixtureRegistry.names()
  return "leaky_pretrain"


@pytest.mark.slow
def test_evaluator_runs_every_benchmark_and_reports_train_overlap(eval_root, tmp_path, tiny_config, monkeypatch):
  monkeypatch.setenv("MM1_DIGEST_CACHE", str(tmp_path / "digests"))
  coco_test, _ = readers.read("coco", "test")
  leaked = coco_test[2]
  mixture = _train_corpus_with(tmp_path, open(leaked["image_path"], "rb").read())
  mesh_cfg = sharding.MeshConfig()
  mesh = sharding.make_mesh(mesh_cfg)
  m = MM1(tiny_config)
  cfg = fewshot.FewShotConfig(benchmarks=OFFICIAL, shots=(0, 2), num_queries=4, batch_size=8, max_new_tokens=3,
                              data_root=str(eval_root), train_mixture=mixture)
  evaluator = fewshot.Evaluator(cfg, m, mesh, mesh_cfg.rules)
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), dummy, jnp.zeros((1, 1, 64, 64, 3), jnp.uint8),
                                jnp.ones_like(dummy), dummy))["params"]
  results = evaluator.evaluate_and_write(params, 3, tmp_path)
  metric = {"coco": "cider", "nocaps": "cider", "textcaps": "cider", "gqa": "exact_match"}
  for name in OFFICIAL:
    for k in (0, 2):
      assert f"{name}/{k}shot/{metric.get(name, 'accuracy')}" in results
      assert results[f"{name}/{k}shot/decode_tokens_per_s"] > 0
  # VQAv2 and OK-VQA annotations carry answer types (all "number" here); the others none.
  assert {k for k in results if k.count("/") == 3} == {
      f"{n}/{k}shot/accuracy/number" for n in ("vqav2", "okvqa") for k in (0, 2)}
  info = json.loads((tmp_path / "eval" / "step_3.json").read_text())["info"]
  assert info["coco"]["train_overlap"] == 1 and info["coco"]["train_overlap_ids"] == [leaked["id"]]
  assert all(info[n]["train_overlap"] == 0 for n in OFFICIAL if n != "coco")
  # The missing VQAv2 image: its two questions are skipped and counted, the next ones scored.
  assert info["vqav2"]["skipped_unreadable_images"] == 2

  # Dropping overlaps leaves the leaked image out of the scored queries.
  cfg = fewshot.FewShotConfig(benchmarks=("coco",), shots=(0,), num_queries=None, batch_size=8, max_new_tokens=2,
                              data_root=str(eval_root), train_mixture=mixture, drop_train_overlap=True)
  evaluator = fewshot.Evaluator(cfg, m, mesh, mesh_cfg.rules)
  assert [q["id"] for q in evaluator._queries(evaluator.benchmarks["coco"])] == [
      r["id"] for r in coco_test if r["id"] != leaked["id"]]

