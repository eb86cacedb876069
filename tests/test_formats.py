"""Real corpus formats -> mm1-data build -> seqio tasks -> training batches.

Every test writes small files in the real format (with bad records of each kind)
and checks what is written, what is skipped and why."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm1_jax.data import build, formats, tfds_layout
from mm1_jax.data.tokenizer import IMAGE_TOKEN


def _image(size=(48, 40), color=(200, 30, 30), fmt="JPEG") -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format=fmt)
  return buf.getvalue()


GOOD = _image()
TRUNCATED = GOOD[: len(GOOD) // 2]
TINY = _image((8, 8))


def _tar(path: Path, members: dict[str, bytes]):
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def make_webdataset(folder: Path, n: int) -> Path:
  """A webdataset folder of one tar: n JPEGs of distinct colours with numbered captions."""
  folder.mkdir()
  members = {}
  for i in range(n):
    members[f"{i:04d}.jpg"] = _image((80, 60), (i * 20, 100, 50))
    members[f"{i:04d}.txt"] = f"a red box number {i}".encode()
  _tar(folder / "s.tar", members)
  return folder


def _build(tmp_path, fmt, src, **kwargs):
  report = build.build(fmt, src, tmp_path / "out", progress=False, num_shards=2, **kwargs)
  return report, tmp_path / "out"


def _read_back(out: Path, kind: str):
  import tensorflow as tf

  from mm1_jax.data import sources

  records = sources.corpus_source(out, kind).random_access("train")
  return [tf.train.Example.FromString(records[i]) for i in range(len(records))]


def _field(example, name):
  return list(example.features.feature[name].bytes_list.value)


def test_webdataset_shards(tmp_path):
  from mm1_jax.data import sources

  src = tmp_path / "wds"
  src.mkdir()
  _tar(src / "shard-000.tar", {
      "a/0001.jpg": GOOD, "a/0001.txt": "a red box".encode(),
      "a/0002.jpg": GOOD, "a/0002.json": json.dumps({"caption": "red again"}).encode(),
      "a/0003.png": _image(fmt="PNG"), "a/0003.txt": "a png".encode(),
      "a/0004.jpg": TRUNCATED, "a/0004.txt": b"truncated",
      "a/0005.jpg": TINY, "a/0005.txt": b"tiny",
      "a/0006.txt": b"no image here",
      "a/0007.jpg": GOOD, "a/0007.txt": b"  ",
      "a/0008.jpg": GOOD, "a/0008.txt": b"\xff\xfe not utf-8",
      "a/0009.webp": _image(fmt="WEBP"), "a/0009.txt": b"webp becomes jpeg",
  })
  (src / "broken.tar").write_bytes(b"not a tar at all")
  report, out = _build(tmp_path, "webdataset", src)
  assert report["written"] == {"caption": 4}
  assert report["skipped"] == {"bad_record": 1, "bad_utf8": 1, "corrupt_image": 1, "empty_text": 1,
                               "image_too_small": 1, "missing_image": 1}
  examples = _read_back(out, "caption")
  captions = sorted(_field(e, "caption")[0].decode() for e in examples)
  assert captions == ["a png", "a red box", "red again", "webp becomes jpeg"]
  for e in examples:  # every stored image is JPEG or PNG, whatever came in
    assert Image.open(io.BytesIO(_field(e, "image")[0])).format in ("JPEG", "PNG")
  assert json.loads((out / "build.json").read_text())["caption/train_webdataset"]["written"] == {"caption": 4}
  # The split's shards: at most --num_shards (a shard that gets no record is not written),
  # named as TFDS names them, holding every record once.
  n = report["tfds"]["shards"]
  assert report["tfds"] == {"name": "mm1_caption", "version": "1.0.0", "split": "train_webdataset", "shards": n}
  assert 1 <= n <= 2
  shards = sources.corpus_source(out, "caption").list_shards("train")
  assert [Path(f).name for f in shards] == [tfds_layout.shard_name("caption", "train_webdataset", i, n)
                                            for i in range(n)]
  lengths = tfds_layout.read_metadata(out, "caption")["splits"]["train_webdataset"]["shard_lengths"]
  assert len(lengths) == n and sum(lengths) == 4 and min(lengths) > 0


def test_coco_annotations(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "1.jpg").write_bytes(GOOD)
  (tmp_path / "images" / "2.jpg").write_bytes(TRUNCATED)
  coco = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                     {"id": 3, "file_name": "gone.jpg"}],
          "annotations": [{"id": 10, "image_id": 1, "caption": "one"}, {"id": 11, "image_id": 1, "caption": "uno"},
                          {"id": 12, "image_id": 2, "caption": "two"}, {"id": 13, "image_id": 3, "caption": "x"},
                          {"id": 14, "image_id": 99, "caption": "y"}, {"id": 15, "image_id": 1, "caption": ""}]}
  ann = tmp_path / "captions_train.json"
  ann.write_text(json.dumps(coco))
  report, out = _build(tmp_path, "coco", ann, image_root=tmp_path / "images")
  assert report["written"] == {"caption": 2}
  assert report["skipped"] == {"corrupt_image": 1, "empty_text": 1, "missing_file": 1, "missing_image": 1}
  assert sorted(_field(e, "caption")[0] for e in _read_back(out, "caption")) == [b"one", b"uno"]


def _obelics_rows():
  return [
      {"texts": ["Intro.", None, "After the picture."], "images": [None, "pics/a.jpg", None]},
      {"texts": [None, "Only text after a broken image."], "images": ["pics/broken.jpg", None]},
      {"texts": [None, None], "images": ["pics/a.jpg", "pics/a.jpg"]},  # images only
      {"texts": ["x"], "images": []},  # misaligned
      {"texts": ["Many", None, None, None], "images": [None, "pics/a.jpg", "pics/a.jpg", "pics/a.jpg"]},
      {"texts": ["Remote", None], "images": [None, "https://example.com/x.jpg"]},
  ]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_obelics_rows(tmp_path, suffix):
  (tmp_path / "pics").mkdir()
  (tmp_path / "pics" / "a.jpg").write_bytes(GOOD)
  (tmp_path / "pics" / "broken.jpg").write_bytes(TRUNCATED)
  rows = _obelics_rows()
  src = tmp_path / f"docs.{suffix}"
  if suffix == "jsonl":
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), src)
  report, out = _build(tmp_path, "obelics", src, checks=formats.Checks(max_images=2))
  # Written: the intro doc, and the 3-image doc cut to 2. The broken image's doc loses
  # its only image; the remote image is dropped from its document, which then has none.
  assert report["written"] == {"interleaved": 2}
  assert report["truncated_documents"] == 1
  # bad_record: the misaligned row, and in JSONL also the line that is not JSON.
  expected_skips = {"bad_record": 2 if suffix == "jsonl" else 1, "no_images": 2, "no_text": 1}
  assert report["skipped"] == expected_skips
  assert report["images_dropped"] == {"corrupt_image": 1, "remote_image": 1}
  docs = sorted((_field(e, "text")[0].decode(), len(_field(e, "images"))) for e in _read_back(out, "interleaved"))
  assert docs == [(f"Intro.\n{IMAGE_TOKEN}\nAfter the picture.", 1), (f"Many\n{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n", 2)]


def test_obelics_images_as_bytes(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [{"texts": ["cap", None], "images": [None, {"bytes": GOOD, "path": None}]}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
  report, _ = _build(tmp_path, "obelics", tmp_path / "d.parquet")
  assert report["written"] == {"interleaved": 1} and report["images_written"] == 1


def test_mmc4_documents(tmp_path):
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "x.jpg").write_bytes(GOOD)
  docs = [
      {"text_list": ["First sentence.", "Second sentence."],
       "image_info": [{"image_name": "x.jpg", "matched_text_index": 1, "matched_sim": 0.3}]},
      {"text_list": ["Lonely."], "image_info": [{"image_name": "missing.jpg", "matched_text_index": 0}]},
      {"text_list": ["Bad info."], "image_info": [{"image_name": "x.jpg"}]},
  ]
  src = tmp_path / "docs.jsonl"
  src.write_text("\n".join(json.dumps(d) for d in docs))
  report, out = _build(tmp_path, "mmc4", src, image_root=tmp_path / "imgs")
  assert report["written"] == {"interleaved": 1}
  assert report["images_dropped"] == {"missing_file": 1}
  assert report["skipped"] == {"bad_record": 1, "no_images": 2}
  (doc,) = _read_back(out, "interleaved")
  assert _field(doc, "text")[0].decode() == f"First sentence.\n{IMAGE_TOKEN}\nSecond sentence."


def test_text_sources(tmp_path):
  src = tmp_path / "text"
  src.mkdir()
  (src / "a.jsonl").write_text('{"text": "one"}\n{"text": ""}\n{"body": "x"}\n{bad\n{"text": "two"}\n')
  (src / "b.txt").write_text("a plain document\n")
  (src / "c.txt").write_bytes(b"\xff\xfe\xfa")
  report, out = _build(tmp_path, "text", src)
  assert report["written"] == {"text": 3}
  assert report["skipped"] == {"bad_record": 1, "bad_utf8": 1, "empty_text": 2}


def test_cli_prints_one_json_line_and_refuses_to_overwrite(tmp_path, capsys):
  (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
  args = ["build", "--format=text", f"--src={tmp_path / 't.jsonl'}", f"--out={tmp_path / 'o'}", "--no_progress"]
  assert build.main(args) == 0
  line = json.loads(capsys.readouterr().out.strip())
  assert line["written"] == {"text": 1} and line["skipped"] == {}
  assert build.main(args) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert build.main(args + ["--overwrite"]) == 0


@pytest.mark.slow
def test_built_corpus_trains_through_seqio(tmp_path):
  """A built folder registered as tasks + mixture gives packed MM1 batches."""
  import seqio

  from mm1_jax.data import pipeline, sources
  from tasks import shapes

  wds = make_webdataset(tmp_path / "wds", 12)
  out = tmp_path / "corpus"
  build.build("webdataset", wds, out, progress=False, num_shards=3)
  docs = tmp_path / "docs.jsonl"
  (tmp_path / "a.jpg").write_bytes(_image((64, 96)))
  docs.write_text("\n".join(json.dumps({"texts": [f"doc {i}", None, "end"], "images": [None, "a.jpg", None]})
                            for i in range(6)))
  build.build("obelics", docs, out, progress=False, num_shards=2)
  (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"plain text {i}"}) for i in range(5)))
  build.build("text", tmp_path / "t.jsonl", out, progress=False, num_shards=1)

  names = sources.register_corpus("mytest", out, image_size=32, output_features=shapes.OUTPUT_FEATURES)
  assert names == ["mytest_caption", "mytest_interleaved", "mytest_text"]
  assert "mytest_pretrain" in seqio.MixtureRegistry.names()
  cfg = pipeline.DataConfig(mixture_or_task_name="mytest_pretrain", batch_size=4, seq_len=64, max_images=3,
                            module_imports=())
  ds = pipeline.make_dataset(cfg, tokens_per_image=4, image_size=32, shard_index=1, num_shards=2)
  batch = next(pipeline.iterate(ds))
  assert batch["images"].shape == (2, 3, 32, 32, 3) and batch["tokens"].shape == (2, 64)
  assert (batch["images"].reshape(2, -1).max(axis=1) > 0).all()
  # Host shards of the caption task are disjoint and cover it.
  task = seqio.get_mixture_or_task("mytest_caption")
  ids = [set(ex["id"] for ex in task.source.get_dataset("train", shuffle=True, seed=1,
                                                          shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator())
         for i in range(2)]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 12
  # Global shuffle: seeded, so the same seed gives the same order.
  order = lambda seed: [ex["id"] for ex in task.source.get_dataset("train", seed=seed).as_numpy_iterator()]  # noqa: E731
  assert order(3) == order(3) and sorted(order(3)) == sorted(order(4)) and order(3) != order(4)


def test_resize_and_crop_keeps_the_centre():
  import tensorflow as tf

  from mm1_jax.data import preprocessors

  wide = np.zeros((40, 80, 3), np.uint8)
  wide[:, 20:60] = 255  # a white centre band as wide as the height
  out = preprocessors.decode_image(tf.constant(_png(wide)), 20).numpy()
  assert out.shape == (20, 20, 3)
  assert out[:, 2:-2].min() > 200  # the centre square is the white band


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def test_both_loaders_give_a_record_the_same_pixels(tmp_path):
  """The grain and tf.data loaders decode and resize a record's image with one function:
  a noisy, odd-sized JPEG gives bit-identical pixels on both (TF's antialiased bilinear
  resize and PIL's bicubic one differ in most pixels)."""
  from mm1_jax.data import loader, pipeline, sources
  from tasks import shapes

  rng = np.random.default_rng(0)
  wds = tmp_path / "wds"
  wds.mkdir()
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (53, 91, 3), dtype=np.uint8)).save(buf, format="JPEG")
  _tar(wds / "s.tar", {"0000.jpg": buf.getvalue(), "0000.txt": b"noise"})
  out = tmp_path / "corpus"
  build.build("webdataset", wds, out, progress=False, num_shards=1)
  sources.register_corpus("pixels", out, image_size=32, output_features=shapes.OUTPUT_FEATURES,
                          kinds=("caption",), rates={"caption": 1.0})
  images = {}
  for name in ("grain", "tfdata"):
    cfg = pipeline.DataConfig(mixture_or_task_name="pixels_pretrain", batch_size=1, seq_len=32, max_images=1,
                              module_imports=(), loader=name)
    if name == "grain":
      batch = next(loader.make_loader(cfg, tokens_per_image=4, image_size=32))
    else:
      batch = next(pipeline.iterate(pipeline.make_dataset(cfg, tokens_per_image=4, image_size=32)))
    images[name] = batch["images"][0, 0]
  assert images["grain"].shape == (32, 32, 3) and images["grain"].std() > 20
  np.testing.assert_array_equal(images["tfdata"], images["grain"])
