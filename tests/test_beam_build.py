"""`mm1-data build` on Apache Beam: the same corpus from one worker or several, sources
read in parts, held-out images and exact duplicates left out in the pipeline, and the
output as a TFDS dataset that TFDS and seqio load."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_formats import GOOD, TRUNCATED, _image, _tar

from mm1_jax.data import build, formats, sources, tfds_layout
from mm1_jax.data.tokenizer import IMAGE_TOKEN


def _captions(folder: Path, tars: int = 3, per_tar: int = 6) -> Path:
  """Webdataset tars with a truncated image, a caption-less sample, and two exact
  duplicates of sample 0 (same image and caption under other keys, one in another tar)."""
  folder.mkdir()
  for t in range(tars):
    members = {}
    for i in range(per_tar):
      members[f"s{t}_{i:02d}.jpg"] = _image((64, 48), (40 * t, 20 * i, 90))
      members[f"s{t}_{i:02d}.txt"] = f"box {t} {i}".encode()
    if t == 0:
      members["s0_90.jpg"], members["s0_90.txt"] = TRUNCATED, b"broken"
      members["s0_91.jpg"] = GOOD
    members[f"z{t}.jpg"], members[f"z{t}.txt"] = _image((64, 48), (0, 0, 90)), b"box 0 0"  # = s0_00
    _tar(folder / f"shard-{t}.tar", members)
  return folder


def _documents(root: Path, held: bytes) -> Path:
  (root / "pics").mkdir(parents=True)
  for i in range(4):
    (root / "pics" / f"{i}.jpg").write_bytes(_image((50, 50), (60 * i, 30, 30)))
  (root / "pics" / "eval.jpg").write_bytes(held)
  rows = [{"texts": [f"doc {d}", None, "end"], "images": [None, f"pics/{d % 4}.jpg", None]} for d in range(8)]
  rows.append({"texts": ["has an eval image", None, None], "images": [None, "pics/eval.jpg", "pics/1.jpg"]})
  rows.append(rows[0])  # an exact duplicate
  (root / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
  return root / "docs.jsonl"


def _records(out, kind):
  src = sources.corpus_source(out, kind)
  return src, [bytes(r) for r in src.random_access("train")]


def _without_out(report):
  return {k: v for k, v in report.items() if k != "out"}


@pytest.mark.slow  # starts Beam worker processes
def test_two_direct_runner_workers_write_the_same_corpus_and_counts_as_one(tmp_path):
  """The shards are keyed and sorted by content, so the files do not depend on which worker read what."""
  held = _image((52, 52), (250, 250, 0))
  (tmp_path / "held.txt").write_text(hashlib.sha256(held).hexdigest() + "\n" + "0" * 64 + "\n")
  wds = _captions(tmp_path / "wds")
  docs = _documents(tmp_path / "docs", held)
  reports = {}
  for workers in (1, 2):
    out = tmp_path / f"out{workers}"
    reports[workers] = [
        build.build("webdataset", wds, out, progress=False, num_shards=4, num_workers=workers),
        build.build("obelics", docs, out, progress=False, num_shards=3, num_workers=workers,
                    held_out=tmp_path / "held.txt")]
  assert [_without_out(r) for r in reports[1]] == [_without_out(r) for r in reports[2]]
  captions, documents = reports[1]
  assert captions["written"] == {"caption": 18} and captions["images_written"] == 18
  assert captions["skipped"] == {"corrupt_image": 1, "duplicate": 3, "empty_text": 1}
  assert documents["written"] == {"interleaved": 9}
  assert documents["skipped"] == {"bad_record": 1, "duplicate": 1}
  assert documents["images_dropped"] == {"held_out_image": 1} and documents["held_out_digests"] == 2
  for kind in ("caption", "interleaved"):
    one, two = tfds_layout.dataset_dir(tmp_path / "out1", kind), tfds_layout.dataset_dir(tmp_path / "out2", kind)
    shards = sorted(p.name for p in one.glob("*.array_record-*"))
    assert shards and shards == sorted(p.name for p in two.glob("*.array_record-*"))
    for name in shards:
      assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_duplicates_keep_the_smallest_id_and_held_out_images_never_reach_the_corpus(tmp_path):
  import tensorflow as tf

  held = _image((52, 52), (250, 250, 0))
  wds = _captions(tmp_path / "wds", tars=2, per_tar=3)
  _tar(wds / "shard-9.tar", {"e.jpg": held, "e.txt": b"an eval image"})
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "q.jpg").write_bytes(held)  # --held_out as a folder of images
  docs = _documents(tmp_path / "docs", held)
  out = tmp_path / "out"
  report = build.build("webdataset", wds, out, progress=False, num_shards=2, held_out=tmp_path / "eval")
  assert report["skipped"]["held_out_image"] == 1 and report["skipped"]["duplicate"] == 2
  _, records = _records(out, "caption")
  examples = [tf.train.Example.FromString(r).features.feature for r in records]
  ids = sorted(e["id"].bytes_list.value[0].decode() for e in examples)
  assert "shard-0.tar/s0_00" in ids and not [i for i in ids if "/z" in i]  # the copies (z*) went, the original stayed
  assert not [e for e in examples if e["image"].bytes_list.value[0] == held]
  build.build("obelics", docs, out, progress=False, num_shards=2, held_out=tmp_path / "eval")
  _, records = _records(out, "interleaved")
  texts = {tf.train.Example.FromString(r).features.feature["text"].bytes_list.value[0].decode(): r
           for r in records}
  [doc] = [r for t, r in texts.items() if t.startswith("has an eval image")]
  kept = tf.train.Example.FromString(doc).features.feature
  assert kept["text"].bytes_list.value[0].decode().count(IMAGE_TOKEN) == 1
  assert list(kept["images"].bytes_list.value) == [(tmp_path / "docs" / "pics" / "1.jpg").read_bytes()]


def test_a_held_out_list_that_is_not_digests_is_refused(tmp_path):
  (tmp_path / "held.txt").write_text("not-a-digest\n")
  with pytest.raises(ValueError, match="not a SHA-256"):
    build.held_out_digests(tmp_path / "held.txt")


def test_large_files_are_read_in_parts_with_the_records_and_ids_of_one_pass(tmp_path):
  """JSONL by line-aligned byte ranges, Parquet by row groups, JSON lists by items: a
  worker per part reads exactly what one reader of the whole file reads."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  (tmp_path / "pics").mkdir()
  (tmp_path / "pics" / "a.jpg").write_bytes(GOOD)
  rows = [{"texts": [f"document {i} " * (i % 7 + 1), None], "images": [None, "pics/a.jpg"]} for i in range(40)]
  lines = [json.dumps(r) for r in rows]
  lines[5], lines[17] = "{broken", ""
  (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=3)
  coco = {"images": [{"id": 1, "file_name": "pics/a.jpg"}],
          "annotations": [{"id": i, "image_id": 1, "caption": f"c{i}"} for i in range(25)]}
  (tmp_path / "c.json").write_text(json.dumps(coco))

  def records(units):
    return [(type(r).__name__, r.id, getattr(r, "text", getattr(r, "reason", ""))) for u in units
            for r in formats.read_unit(u)]

  for fmt, src in (("obelics", "d.jsonl"), ("obelics", "d.parquet"), ("coco", "c.json")):
    whole = formats.units(fmt, tmp_path / src, tmp_path, part_bytes=1 << 30, part_items=10**9,
                          part_row_groups=10**9)
    parts = formats.units(fmt, tmp_path / src, tmp_path, part_bytes=200, part_items=4, part_row_groups=2)
    assert len(whole) == 1 and len(parts) > 3, (fmt, src, len(parts))
    assert records(parts) == records(whole), (fmt, src)
  ids = [r[1] for r in records(formats.units("obelics", tmp_path / "d.jsonl", tmp_path, part_bytes=200))]
  starts = np.cumsum([0] + [len(line) + 1 for line in lines])  # each line's first byte
  assert ids == [f"d.jsonl@{starts[i]}" for i in range(len(lines)) if i != 17]  # the blank line gives nothing


@pytest.mark.slow
def test_the_corpus_loads_through_tfds_and_through_a_seqio_task_over_all_its_tags(tmp_path):
  import seqio
  import tensorflow_datasets as tfds

  from tasks import shapes

  a = _captions(tmp_path / "a", tars=1, per_tar=4)
  b = tmp_path / "b"
  b.mkdir()
  _tar(b / "x.tar", {"k.jpg": _image((60, 60), (1, 2, 3)), "k.txt": b"from the second source"})
  out = tmp_path / "corpus"
  build.build("webdataset", a, out, progress=False, num_shards=2, tag="first")
  build.build("webdataset", b, out, progress=False, num_shards=2, tag="second")
  build.build("webdataset", b, out, progress=False, num_shards=1, split="validation", tag="second")
  ds = tfds.data_source("mm1_caption", data_dir=str(out), split="train_first+train_second")
  got = sorted(ds[i]["id"].decode() if isinstance(ds[i]["id"], bytes) else ds[i]["id"] for i in range(len(ds)))
  assert len(got) == 5 and "x.tar/k" in got
  assert isinstance(ds[0]["image"], bytes)  # encoded bytes, decoded by mm1_jax.data.images
  info = tfds.builder("mm1_caption", data_dir=str(out)).info
  assert info.splits["train_first"].num_examples == 4 and info.splits["validation_second"].num_examples == 1
  assert info.metadata["splits"]["train_second"]["build"]["written"] == {"caption": 1}

  sources.register_corpus("tfdsc", out, image_size=32, output_features=shapes.OUTPUT_FEATURES,
                          kinds=("caption",), rates={"caption": 1.0})
  task = seqio.get_mixture_or_task("tfdsc_caption")
  assert isinstance(task.source, seqio.TfdsDataSource)
  assert task.source.num_input_examples("train") == 5
  ids = sorted(ex["id"].decode() for ex in task.source.get_dataset("train", shuffle=False).as_numpy_iterator())
  assert ids == got
  batch = next(task.get_dataset({"text": 32}, split="train", shuffle=False).as_numpy_iterator())
  assert batch["images"].dtype == np.uint8 and batch["text"].size > 0


def test_rebuilding_a_split_needs_overwrite_and_replaces_only_its_shards(tmp_path):
  wds = _captions(tmp_path / "wds", tars=1, per_tar=8)
  out = tmp_path / "out"
  build.build("webdataset", wds, out, progress=False, num_shards=4, tag="cc")
  build.build("webdataset", wds, out, progress=False, num_shards=2, tag="other")
  with pytest.raises(FileExistsError, match="--overwrite"):
    build.build("webdataset", wds, out, progress=False, num_shards=2, tag="cc")
  build.build("webdataset", wds, out, progress=False, num_shards=1, tag="cc", overwrite=True)
  folder = tfds_layout.dataset_dir(out, "caption")
  assert sorted(p.name for p in folder.glob("*-train_cc.*")) == ["mm1_caption-train_cc.array_record-00000-of-00001"]
  assert len(list(folder.glob("*-train_other.*"))) == 2
  assert not list(folder.glob(".staging-*"))
  assert tfds_layout.split_expression(out, "caption", "train") == "train_cc+train_other"
  with pytest.raises(ValueError, match="--tag"):
    build.build("webdataset", wds, out, progress=False, tag="bad-tag")


def test_corpora_in_the_earlier_layout_still_load(tmp_path):
  from mm1_jax.data import corpus

  shards = corpus.ShardWriter(tmp_path / "old" / "text", "train-text", 2)
  for i in range(5):
    shards.write(corpus.tf_example({"id": f"t{i}", "text": f"old text {i}"}))
  shards.close()
  src, records = _records(tmp_path / "old", "text")
  assert isinstance(src, sources.ArrayRecordExampleSource) and len(records) == 5
  assert isinstance(sources.corpus_source(tmp_path / "missing", "text"), sources.TfdsCorpusSource)
  with pytest.raises(FileNotFoundError, match="mm1-data build"):
    sources.corpus_source(tmp_path / "missing", "text").random_access("train")


def test_the_cli_passes_beam_options_to_beam_and_refuses_unknown_flags_elsewhere(tmp_path, capsys):
  wds = _captions(tmp_path / "wds", tars=1, per_tar=3)
  assert build.main(["build", "--format=webdataset", f"--src={wds}", f"--out={tmp_path / 'o'}", "--no_progress",
                     "--num_shards=1", "--runner=DirectRunner", "--direct_running_mode=in_memory"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["written"] == {"caption": 3} and report["tfds"]["split"] == "train_webdataset"
  with pytest.raises(SystemExit):
    build.main(["inspect", "--mixture=x", "--runner=DirectRunner"])


def test_records_no_reader_foresaw_are_counted_not_fatal(tmp_path):
  (tmp_path / "pics").mkdir()
  (tmp_path / "pics" / "a.jpg").write_bytes(GOOD)
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"texts": [123, None], "images": [None, "pics/a.jpg"]},  # a number where text goes
      {"texts": ["fine", None], "images": [None, "pics/a.jpg"]}]) + "\n")
  report = build.build("obelics", tmp_path / "d.jsonl", tmp_path / "o", progress=False, num_shards=1)
  # The number is a text piece that is not text; its document is left with an image and no text.
  assert report["written"] == {"interleaved": 1} and report["skipped"] == {"bad_utf8": 1, "no_text": 1}
  (tmp_path / "l.json").write_text(json.dumps([
      {"id": "x", "image": 5, "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "o"}]}]))
  assert build.build("llava", tmp_path / "l.json", tmp_path / "o", progress=False)["skipped"] == {"bad_record": 1}
  (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "pics/a.jpg"}],
                                               "annotations": ["not an object", {"image_id": [1], "caption": "c"},
                                                               {"image_id": 1, "caption": "kept"}]}))
  report = build.build("coco", tmp_path / "c.json", tmp_path / "o", progress=False, image_root=tmp_path)
  assert report["written"] == {"caption": 1} and report["skipped"] == {"bad_record": 1, "missing_image": 1}
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.parquet").write_bytes(b"PAR1 not really parquet")
  report = build.build("obelics", tmp_path / "bad", tmp_path / "o2", progress=False)
  assert report["skipped"] == {"bad_record": 1} and report["written"] == {}


def test_a_build_with_nothing_usable_reports_and_leaves_the_dataset_as_it_was(tmp_path, capsys):
  good = _captions(tmp_path / "good", tars=1, per_tar=3)
  bad = tmp_path / "bad"
  bad.mkdir()
  _tar(bad / "x.tar", {"k.jpg": TRUNCATED, "k.txt": b"broken"})
  out = tmp_path / "out"
  assert build.build("webdataset", bad, out, progress=False)["skipped"] == {"corrupt_image": 1}
  assert not tfds_layout.exists(out, "caption") and "unchanged" in capsys.readouterr().err
  first = build.build("webdataset", good, out, progress=False, num_shards=1)
  report = build.build("webdataset", bad, out, progress=False, overwrite=True)
  assert report["written"] == {} and report["tfds"]["shards"] == 0
  _, records = _records(out, "caption")
  assert len(records) == first["written"]["caption"] == 3  # the earlier build of the split still loads whole


def test_a_split_built_later_in_the_process_is_seen_by_new_sources(tmp_path):
  wds = _captions(tmp_path / "wds", tars=1, per_tar=2)
  out = tmp_path / "out"
  n = build.build("webdataset", wds, out, progress=False, tag="a")["written"]["caption"]
  assert sources.corpus_source(out, "caption").num_input_examples("train") == n
  build.build("webdataset", wds, out, progress=False, tag="b")
  assert sources.corpus_source(out, "caption").num_input_examples("train") == 2 * n


def test_a_folder_with_both_layouts_of_one_kind_is_refused(tmp_path):
  from mm1_jax.data import corpus

  shards = corpus.ShardWriter(tmp_path / "out" / "caption", "train-old", 1)
  shards.write(corpus.tf_example({"id": "o", "image": GOOD, "caption": "old"}))
  shards.close()
  build.build("webdataset", _captions(tmp_path / "wds", tars=1, per_tar=1), tmp_path / "out", progress=False)
  with pytest.raises(ValueError, match="both layouts"):
    sources.corpus_source(tmp_path / "out", "caption")


def test_a_misspelt_build_flag_is_an_error_not_a_beam_option(tmp_path, capsys):
  wds = _captions(tmp_path / "wds", tars=1, per_tar=1)
  with pytest.raises(SystemExit):
    build.main(["build", "--format=webdataset", f"--src={wds}", f"--out={tmp_path / 'o'}", "--numshards=3"])
  assert "--numshards=3" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_examples_are_encoded_as_tensorflow_encodes_them():
  import tensorflow as tf

  from mm1_jax.data import corpus

  for features in ({"id": "a", "image": b"\x00" * 300, "caption": "h\u00e9llo"}, {"id": "x", "images": [], "text": ""},
                   {"images": [b"a" * 200_000, b"b"], "zz": "q", "aa": ["1", "2"]}):
    want = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[
            x if isinstance(x, bytes) else x.encode() for x in (v if isinstance(v, list) else [v])]))
        for k, v in features.items()})).SerializeToString(deterministic=True)
    assert corpus.tf_example(features) == want
