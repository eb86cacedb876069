"""Writes the shapes-world corpus as sharded files of tf.train.Examples.

Layout under the data dir (default `$MM1_DATA_DIR`, else ~/.cache/mm1_jax/shapes_world):

  caption/train-0000X-of-00008.array_record  image (PNG bytes), caption, id
  interleaved/train-...                      images (list of PNG bytes), text with <image> markers, id
  text/train-...                             text, id
  chat/train-...                             images (list of PNG bytes), conversations (LLaVA JSON), id
  caption_eval/{support,test}-...tfrecord    image, caption, references (list), id
  vqa_eval/{support,test}-...tfrecord        image, question, answers (list), answer_type, id
  text_eval/test-...tfrecord                 text, id (held-out text documents, for perplexity)
  textqa_eval/{support,test}-...tfrecord     question, answers (list), answer_type, id (no image)

The detail corpus (`DetailSpec`, under `detail_data_dir()`: the data dir's name + "_detail")
holds chat/ and vqa_eval/ alone, laid out as above, with scenes rendered larger than the
encoder's input: the test of high-resolution SFT (docs/sft_and_encoders.md).

Training splits are ArrayRecord, the layout `mm1-data build` writes (random access for
the grain loader); the small eval splits are read once, in order, as TFRecord.
  manifest.json                              the spec it was written from and the counts

The corpus is written once, to a temporary folder that is renamed into place, so a
crash or a concurrent writer never leaves a half-written corpus behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from mm1_jax import protowire
from mm1_jax.data import shapes_world as sw

VERSION = 6  # bump when generated content changes, so cached corpora are rebuilt


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  seed: int = 0
  image_size: int = 64
  max_images: int = 3  # per interleaved document
  num_caption: int = 8_000
  num_interleaved: int = 4_000
  num_text: int = 2_000
  num_chat: int = 16_000  # instruction conversations (SFT): enough that SFT runs see each about once
  num_eval_support: int = 64  # few-shot demonstrations
  num_eval_test: int = 512  # scored queries (runs score the first num_queries)
  num_text_eval: int = 128  # held-out text documents (perplexity, all of them scored)
  num_textqa_support: int = 64  # text questions: demonstrations
  num_textqa_test: int = 256  # text questions: scored queries
  num_shards: int = 8


@dataclasses.dataclass(frozen=True)
class DetailSpec:
  """The detail corpus: conversations and VQA questions about scenes of image_size pixels
  whose shapes are sized for an object_scale image, so as large in pixels as the 64 px
  world's on a canvas twice as wide. A 64 px encoder's input, the whole image downsized,
  halves them (a small circle is then about 6 px across); a 2x2 grid of 64 px crops
  (`highres.SubImages`) keeps them at full size."""
  seed: int = 0
  image_size: int = 128
  object_scale: int = 64
  num_chat: int = 8_000
  num_eval_support: int = 64
  num_eval_test: int = 512
  num_shards: int = 8


def default_data_dir() -> Path:
  return Path(os.environ.get("MM1_DATA_DIR", Path.home() / ".cache" / "mm1_jax" / "shapes_world"))


def detail_data_dir() -> Path:
  """The detail corpus's folder: beside the corpus's, its name + "_detail"."""
  base = default_data_dir()
  return base.with_name(base.name + "_detail")


def tf_example(features: dict) -> bytes:
  """{name: str | bytes | list of them} -> a serialised tf.train.Example of bytes features.

  Encoded here rather than through TensorFlow's proto classes, so that build workers
  need not import TensorFlow; the bytes equal `tf.train.Example(...).SerializeToString(
  deterministic=True)` (features in name order; tests/test_beam_build.py checks): equal
  records give equal bytes in any process.
  """
  field = protowire.field
  entries = []
  for name in sorted(features):
    values = features[name]
    values = values if isinstance(values, list) else [values]
    byte_list = b"".join(field(1, v if isinstance(v, bytes) else v.encode("utf-8")) for v in values)
    feature = field(1, byte_list)  # Feature.bytes_list = 1; BytesList.value = 1
    entries.append(field(1, field(1, name.encode("utf-8")) + field(2, feature)))  # map entry: key 1, value 2
  return field(1, b"".join(entries))  # Example.features = 1; Features.feature = 1 (a map)


class ShardWriter:
  """Round-robin ArrayRecord writers for one kind and split, created on first write."""

  def __init__(self, folder: Path, prefix: str, num_shards: int):
    self.folder, self.prefix, self.num_shards = folder, prefix, num_shards
    self._writers = None
    self.count = 0

  def write(self, record: bytes) -> None:
    if self._writers is None:
      from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415  (array_record: only when writing shards)

      self.folder.mkdir(parents=True, exist_ok=True)
      n = self.num_shards
      # group_size:1 keeps every record individually addressable (random access).
      self._writers = [ArrayRecordWriter(str(self.folder / f"{self.prefix}-{i:05d}-of-{n:05d}.array_record"),
                                         "group_size:1") for i in range(n)]
    self._writers[self.count % self.num_shards].write(record)
    self.count += 1

  def close(self) -> None:
    for w in self._writers or ():
      w.close()


def _train_writer(folder: Path, num_shards: int):
  return ShardWriter(folder, "train", num_shards)


class _ShardedWriter:
  def __init__(self, folder: Path, split: str, num_shards: int):
    import tensorflow as tf
    folder.mkdir(parents=True, exist_ok=True)
    self._writers = [tf.io.TFRecordWriter(str(folder / f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord"))
                     for i in range(num_shards)]
    self.count = 0

  def write(self, record: bytes) -> None:
    self._writers[self.count % len(self._writers)].write(record)
    self.count += 1

  def close(self) -> None:
    for w in self._writers:
      w.close()


def _digest(png: bytes) -> str:
  return hashlib.sha1(png).hexdigest()


def write_corpus(out_dir: Path, spec: CorpusSpec, progress: bool = True) -> dict:
  """Generates every split into out_dir; returns the manifest."""
  out_dir = Path(out_dir)
  s = spec
  total = (s.num_caption + s.num_interleaved + s.num_text + s.num_chat
           + 2 * (s.num_eval_support + s.num_eval_test)
           + s.num_text_eval + s.num_textqa_support + s.num_textqa_test)
  bar = tqdm(total=total, desc="shapes world corpus", unit="ex", disable=not progress)
  counts: dict[str, int] = {}
  train_digests: set[str] = set()

  w = _train_writer(out_dir / "caption", s.num_shards)
  for i in range(s.num_caption):
    ex = sw.caption_example(s.seed, i, s.image_size)
    png = sw.encode_png(ex["image"])
    train_digests.add(_digest(png))
    w.write(tf_example({"id": ex["id"], "image": png, "caption": ex["caption"]}))
    bar.update()
  w.close()
  counts["caption/train"] = w.count

  w = _train_writer(out_dir / "interleaved", s.num_shards)
  for i in range(s.num_interleaved):
    ex = sw.interleaved_example(s.seed, i, s.image_size, s.max_images)
    pngs = [sw.encode_png(im) for im in ex["images"]]
    train_digests.update(_digest(p) for p in pngs)
    w.write(tf_example({"id": ex["id"], "text": ex["text"], "images": pngs}))
    bar.update()
  w.close()
  counts["interleaved/train"] = w.count

  w = _train_writer(out_dir / "text", s.num_shards)
  train_texts: set[str] = set()
  for i in range(s.num_text):
    ex = sw.text_example(s.seed, i)
    train_texts.add(ex["text"])
    w.write(tf_example({"id": ex["id"], "text": ex["text"]}))
    bar.update()
  w.close()
  counts["text/train"] = w.count

  counts["chat/train"] = _write_chat(out_dir, s.seed, s.num_chat, s.image_size, s.num_shards, train_digests, bar)

  # Eval splits: support (demonstrations) and test (queries) from their own streams;
  # any image that also occurs in training is dropped and counted.
  leaked = 0
  for task, make in (("caption_eval", sw.caption_example), ("vqa_eval", sw.vqa_example)):
    leaked += _write_image_eval(out_dir, task, make, s.seed, s.image_size,
                                (("support", s.num_eval_support), ("test", s.num_eval_test)), train_digests,
                                bar, counts)

  # Held-out text documents from their own stream; any whose exact text is also a
  # training text document is dropped and counted.
  leaked_texts = 0
  w = _ShardedWriter(out_dir / "text_eval", "test", 1)
  index = 0
  while w.count < s.num_text_eval:
    ex = sw.text_example(s.seed, index, stream="text_eval")
    index += 1
    if ex["text"] in train_texts:
      leaked_texts += 1
      continue
    w.write(tf_example({"id": ex["id"], "text": ex["text"]}))
    bar.update()
  w.close()
  counts["text_eval/test"] = w.count

  # Questions on the facts the text documents state (their answers are those facts, so
  # they are meant to be learnt from training; nothing to hold out).
  index = 0
  for split, n in (("support", s.num_textqa_support), ("test", s.num_textqa_test)):
    w = _ShardedWriter(out_dir / "textqa_eval", split, 1)
    for _ in range(n):
      ex = sw.textqa_example(s.seed, index)
      index += 1
      w.write(tf_example({k: ex[k] for k in ("id", "question", "answers", "answer_type")}))
      bar.update()
    w.close()
    counts[f"textqa_eval/{split}"] = w.count
  bar.close()
  manifest = {"version": VERSION, "spec": dataclasses.asdict(spec), "counts": counts,
              "eval_images_dropped_as_seen_in_training": leaked,
              "eval_texts_dropped_as_seen_in_training": leaked_texts}
  (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
  return manifest


def _write_chat(out_dir: Path, seed: int, n: int, image_size: int, num_shards: int, digests: set[str], bar,
                stream: str = "chat", object_scale: int | None = None) -> int:
  """Conversations into out_dir/chat (train shards), their images' digests into `digests`."""
  w = _train_writer(out_dir / "chat", num_shards)
  for i in range(n):
    ex = sw.chat_example(seed, i, image_size, stream=stream, object_scale=object_scale)
    pngs = [sw.encode_png(im) for im in ex["images"]]
    digests.update(_digest(p) for p in pngs)
    w.write(tf_example({"id": ex["id"], "images": pngs, "conversations": json.dumps(ex["conversations"])}))
    bar.update()
  w.close()
  return w.count


def _write_image_eval(out_dir: Path, folder: str, make, seed: int, image_size: int, splits, train_digests: set[str],
                      bar, counts: dict, stream: str | None = None, **scene) -> int:
  """An image eval set (caption or VQA records from `make`) into out_dir/folder, split by
  split ((name, n) pairs) from one stream (default: the folder's name); any record whose
  image is also a training image is dropped. Returns the number dropped."""
  leaked, index = 0, 0
  for split, n in splits:
    w = _ShardedWriter(out_dir / folder, split, 1)
    while w.count < n:
      ex = make(seed, index, image_size, stream=stream or folder, **scene)
      index += 1
      png = sw.encode_png(ex["image"])
      if _digest(png) in train_digests:
        leaked += 1
        continue
      fields = {"id": ex["id"], "image": png}
      if make is sw.caption_example:
        fields.update(caption=ex["caption"], references=ex["references"])
      else:
        fields.update(question=ex["question"], answers=ex["answers"], answer_type=ex["answer_type"])
      w.write(tf_example(fields))
      bar.update()
    w.close()
    counts[f"{folder}/{split}"] = w.count
  return leaked


def write_detail_corpus(out_dir: Path, spec: DetailSpec, progress: bool = True) -> dict:
  """The detail corpus (`DetailSpec`) into out_dir: chat/ and vqa_eval/; returns the manifest."""
  out_dir, s = Path(out_dir), spec
  bar = tqdm(total=s.num_chat + s.num_eval_support + s.num_eval_test, desc="shapes world detail corpus",
             unit="ex", disable=not progress)
  counts: dict[str, int] = {}
  digests: set[str] = set()
  counts["chat/train"] = _write_chat(out_dir, s.seed, s.num_chat, s.image_size, s.num_shards, digests, bar,
                                     stream="chat_detail", object_scale=s.object_scale)
  leaked = _write_image_eval(out_dir, "vqa_eval", sw.vqa_example, s.seed, s.image_size,
                             (("support", s.num_eval_support), ("test", s.num_eval_test)), digests, bar, counts,
                             stream="vqa_eval_detail", object_scale=s.object_scale)
  bar.close()
  manifest = {"version": VERSION, "spec": dataclasses.asdict(spec), "counts": counts,
              "eval_images_dropped_as_seen_in_training": leaked}
  (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
  return manifest


def ensure_corpus(data_dir: Path | None = None, spec: CorpusSpec | DetailSpec = CorpusSpec(),
                  progress: bool = True) -> Path:
  """Returns data_dir, generating the corpus (or, for a `DetailSpec`, the detail corpus) there
  first if it is missing or stale."""
  detail = isinstance(spec, DetailSpec)
  data_dir = Path(data_dir or (detail_data_dir() if detail else default_data_dir()))
  manifest = data_dir / "manifest.json"
  if manifest.exists():
    m = json.loads(manifest.read_text())
    if m.get("version") == VERSION and m.get("spec") == dataclasses.asdict(spec):
      return data_dir
  data_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=".tmp_corpus_", dir=data_dir.parent))
  try:
    (write_detail_corpus if detail else write_corpus)(tmp, spec, progress)
    if data_dir.exists():
      stale = data_dir.with_name(data_dir.name + f".stale.{os.getpid()}")
      data_dir.rename(stale)
      shutil.rmtree(stale, ignore_errors=True)
    try:
      tmp.rename(data_dir)
    except OSError:  # another process finished first; its corpus is identical
      if not (data_dir / "manifest.json").exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return data_dir
