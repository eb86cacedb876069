"""`mm1-data`: build training shards from real corpus formats, and inspect mixtures.

  mm1-data inspect --mixture=NAME [--n=100] [--out=DIR]   (see mm1_jax.data.inspect_data)

  mm1-data build --format=webdataset|coco|obelics|mmc4|text|llava --src=PATH --out=DIR
                 [--image_root=DIR] [--split=train] [--tag=NAME] [--num_shards=8] [--tokenizer=SPEC]

reads every record of PATH (`mm1_jax.data.formats`), checks it, and writes the usable
ones as ArrayRecord shards of tf.train.Examples under DIR/<kind>/ (the layout
`mm1_jax.data.sources` reads; register the folder with `sources.register_corpus`). DIR
may be a bucket (gs://...): the shards are written to a local temporary folder, then
uploaded (the grain loader reads ArrayRecord from gs:// directly).
It prints one JSON line:

  {"written": {"caption": n, ...}, "images_written": n, "skipped": {reason: n},
   "images_dropped": {reason: n}, "truncated_documents": n,
   "interleaved_over_16_images": n, "out": DIR}

and keeps the same report in DIR/build.json (per split and tag). Records are never fatal:
each unusable one is counted under its reason (`formats.REASONS`).

Long documents are kept whole up to `--max_images` (default `DOCUMENT_MAX_IMAGES`): the
loaders split a document that does not fit one sequence into several examples.
"interleaved_over_16_images" counts the interleaved documents written with more images
than one MM1 sequence holds (16), by images alone since the build knows no tokens; with
`--tokenizer`, "interleaved_over_4096_tokens_or_16_images" counts those that exceed one
MM1 sequence (4,096 tokens, 16 images, 144 tokens per image) either way, and
"interleaved_examples_at_mm1_shapes" the examples all written documents become there.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mm1_jax import paths
from mm1_jax.data import documents, formats, inspect_data
from mm1_jax.data.corpus import ShardWriter, tf_example  # noqa: F401  (ShardWriter: re-exported)


def _features(ex: formats.Example) -> dict:
  if ex.kind == "caption":
    return {"id": ex.id, "image": ex.images[0], "caption": ex.text}
  if ex.kind == "interleaved":
    return {"id": ex.id, "images": ex.images, "text": ex.text}
  if ex.kind == "chat":
    return {"id": ex.id, "images": ex.images, "conversations": ex.text}
  return {"id": ex.id, "text": ex.text}


# One MM1 pre-training sequence (`pipeline.DataConfig` defaults; Q of the C-Abstractor).
MM1_SEQ_LEN, MM1_MAX_IMAGES, MM1_TOKENS_PER_IMAGE = 4096, 16, 144
# Images kept per interleaved document at build time (more are cut, as `truncated_documents`):
# the loaders split long documents, so this only bounds the size of one record.
DOCUMENT_MAX_IMAGES = 64
BUILD_CHECKS = formats.Checks(max_images=DOCUMENT_MAX_IMAGES)


class _Mm1Lengths:
  """Counts interleaved documents longer than one MM1 sequence, in tokens when a vocabulary is given."""

  def __init__(self, tokenizer: str | None):
    self.over_images = self.over_sequence = self.examples = 0
    self.vocab = self.image_id = None
    if tokenizer:
      from mm1_jax.data import vocabulary  # noqa: PLC0415  (loads seqio, tensorflow)

      self.vocab = vocabulary.load(tokenizer)
      ids = vocabulary.special_ids(self.vocab)
      self.image_id, self.eos_id = ids.image, ids.eos

  def add(self, rec: formats.Example) -> None:
    if rec.kind != "interleaved":
      return
    self.over_images += len(rec.images) > MM1_MAX_IMAGES
    if self.vocab is None:
      return
    ids = np.asarray(list(self.vocab.encode(rec.text)) + [self.eos_id], np.int32)
    is_image = ids == self.image_id
    expanded = len(ids) + (MM1_TOKENS_PER_IMAGE - 1) * int(is_image.sum())
    self.over_sequence += expanded > MM1_SEQ_LEN + 1 or len(rec.images) > MM1_MAX_IMAGES
    self.examples += len(documents.chunk_bounds(is_image, MM1_SEQ_LEN + 1, MM1_TOKENS_PER_IMAGE, MM1_MAX_IMAGES))

  def report(self) -> dict:
    out = {"interleaved_over_16_images": self.over_images}
    if self.vocab is not None:
      out.update(interleaved_over_4096_tokens_or_16_images=self.over_sequence,
                 interleaved_examples_at_mm1_shapes=self.examples)
    return out


KIND_OF = {"webdataset": "caption", "coco": "caption", "obelics": "interleaved", "mmc4": "interleaved",
           "text": "text", "llava": "chat"}


def build(fmt: str, src: str | Path, out: str | Path, *, image_root: str | Path | None = None,
          split: str = "train", tag: str | None = None, num_shards: int = 8,
          checks: formats.Checks = BUILD_CHECKS, progress: bool = True, overwrite: bool = False,
          tokenizer: str | None = None) -> dict:
  """Converts one source into DIR/<kind>/<split>-<tag>-*.array_record; returns the report.

  Several sources of one kind (CC3M and COYO captions, say) share a corpus under
  different tags (default: the format's name); a task reads all tags of its split.
  tokenizer: a vocabulary (`vocabulary.load`) to count the interleaved documents longer
  than one MM1 sequence in tokens too (see the module doc).
  """
  lengths = _Mm1Lengths(tokenizer)
  target = paths.path(out)  # a local folder, or a bucket: shards are written locally, then uploaded
  prefix = f"{split}-{tag or fmt}"
  existing = sorted(target.glob(f"{KIND_OF[fmt]}/{prefix}-*-of-*.array_record"))
  if existing and not overwrite:
    raise FileExistsError(f"{target} already has {split} shards ({existing[0]}); pass --overwrite to replace them")
  records = formats.read(fmt, Path(src), Path(image_root) if image_root else None)
  target.mkdir(parents=True, exist_ok=True)
  remote = paths.is_remote(target)
  # Shards are written to a staging folder (in the corpus folder, or local for a bucket),
  # then moved or uploaded into place; old shards that no new one replaced are deleted
  # last, so a failed build leaves the previous corpus readable.
  tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=None if remote else target))
  try:
    shards = {k: ShardWriter(tmp / k, prefix, num_shards) for k in ("caption", "interleaved", "text", "chat")}
    skipped, dropped = collections.Counter(), collections.Counter()
    truncated = images = 0
    try:
      for rec in tqdm(records, desc=f"build {fmt}", unit="rec", disable=not progress):
        if isinstance(rec, formats.Skip):
          (dropped if rec.image_only else skipped)[rec.reason] += 1
          continue
        rec, lost, cut = formats.check(rec, checks)
        dropped.update(s.reason for s in lost)
        truncated += cut
        if isinstance(rec, formats.Skip):
          skipped[rec.reason] += 1
          continue
        shards[rec.kind].write(tf_example(_features(rec)))
        images += len(rec.images)
        lengths.add(rec)
    finally:
      for s in shards.values():
        s.close()
    placed = set()
    for kind, s in shards.items():
      if s.count:
        (target / kind).mkdir(parents=True, exist_ok=True)
        for f in sorted((tmp / kind).glob("*.array_record")):
          if remote:
            paths.upload(f, target / kind / f.name)
          else:
            f.rename(target / kind / f.name)
          placed.add(f"{kind}/{f.name}")
    for old in existing:
      if f"{old.parent.name}/{old.name}" not in placed:
        old.unlink()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  report = {"format": fmt, "src": str(src), "split": split, "tag": tag or fmt,
            "written": {k: s.count for k, s in shards.items() if s.count}, "images_written": images,
            "skipped": dict(sorted(skipped.items())), "images_dropped": dict(sorted(dropped.items())),
            "truncated_documents": truncated, **lengths.report(), "out": str(target)}
  log = target / "build.json"
  history = json.loads(log.read_text()) if log.exists() else {}
  history[prefix] = report
  paths.write_text_atomic(log, json.dumps(history, indent=2) + "\n")
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mm1-data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="real corpus format -> ArrayRecord training shards",
                     description="Skip reasons:\n" + "\n".join(f"  {k:16s} {v}" for k, v in formats.REASONS.items()),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  b.add_argument("--format", required=True, choices=formats.FORMATS)
  b.add_argument("--src", required=True, help="a file or a folder of files in that format")
  b.add_argument("--out", required=True, help="output corpus folder, local or a bucket (gs://...: shards are staged locally, then uploaded)")
  b.add_argument("--image_root", default=None, help="where relative image paths point (default: next to --src)")
  b.add_argument("--split", default="train")
  b.add_argument("--tag", default=None, help="names this source's shards (default: the format); "
                 "sources of one kind with different tags add up")
  b.add_argument("--num_shards", type=int, default=8)
  b.add_argument("--min_image_size", type=int, default=formats.Checks.min_image_size)
  b.add_argument("--max_images", type=int, default=DOCUMENT_MAX_IMAGES,
                 help="images per interleaved document; the rest of the document is cut (the loaders split "
                 "documents longer than one sequence into several examples)")
  b.add_argument("--tokenizer", default=None, help="a vocabulary (mm1_jax.data.vocabulary.load: shapes_sp, a "
                 ".model or tokenizer.json path, a folder): also count interleaved documents over one MM1 "
                 "sequence in tokens")
  b.add_argument("--max_image_side", type=int, default=formats.Checks.max_image_side)
  b.add_argument("--overwrite", action="store_true", help="replace existing shards of this split")
  b.add_argument("--no_progress", action="store_true")
  i = sub.add_parser("inspect", help="rates, lengths and a preview of what a mixture feeds the model")
  i.add_argument("--mixture", required=True, help="a registered seqio mixture or task")
  i.add_argument("--n", type=int, default=100, help="examples to read")
  i.add_argument("--out", default="mm1_data_inspect", help="folder for report.json and preview.html")
  i.add_argument("--module_import", action="append", default=["tasks"], help="module registering tasks")
  i.add_argument("--data_dir", default=None, help="a folder `mm1-data build` wrote: registers its tasks "
                 "<prefix>_caption/_interleaved/_text and the mixture <prefix>_pretrain, as a run's DATA_DIR does")
  i.add_argument("--tokenizer", default="shapes_sp", help="with --data_dir: its SentencePiece model (a path, or "
                 "the bundled 'shapes_sp'), as a run's TOKENIZER")
  i.add_argument("--prefix", default="mm1", help="with --data_dir: the task name prefix")
  i.add_argument("--seq_len", type=int, default=128)
  i.add_argument("--max_images", type=int, default=4)
  i.add_argument("--tokens_per_image", type=int, default=16)
  i.add_argument("--image_size", type=int, default=64)
  i.add_argument("--seed", type=int, default=0)
  i.add_argument("--rate_unit", default="records", choices=("records", "tokens"),
                 help="what the mixture rates divide (pipeline.DataConfig.rate_unit)")
  args = parser.parse_args(argv)
  if args.command == "inspect":
    return _inspect(args)
  checks = formats.Checks(args.min_image_size, args.max_images, args.max_image_side)
  try:
    report = build(args.format, args.src, args.out, image_root=args.image_root, split=args.split, tag=args.tag,
                   num_shards=args.num_shards, checks=checks, progress=not args.no_progress,
                   overwrite=args.overwrite, tokenizer=args.tokenizer)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"mm1-data: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report))
  return 0


def _inspect(args) -> int:
  from mm1_jax.data import pipeline  # noqa: PLC0415  (pipeline loads tensorflow, seqio)

  corpora = ()
  if args.data_dir:
    from mm1_jax.data import sources  # noqa: PLC0415  (sources loads tensorflow, seqio)

    corpora = (sources.Corpus(data_dir=args.data_dir, vocabulary=args.tokenizer, prefix=args.prefix),)
  cfg = pipeline.DataConfig(mixture_or_task_name=args.mixture, seq_len=args.seq_len, max_images=args.max_images,
                            seed=args.seed, module_imports=tuple(args.module_import), corpora=corpora,
                            rate_unit=args.rate_unit)
  report = inspect_data.inspect(cfg, n=args.n, out=Path(args.out), tokens_per_image=args.tokens_per_image,
                                image_size=args.image_size)
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("data"))
