"""`mm1-data`: build training corpora from real corpus formats, and inspect mixtures.

  mm1-data inspect --mixture=NAME [--n=100] [--out=DIR]   (see mm1_jax.data.inspect_data)

  mm1-data build --format=webdataset|coco|obelics|mmc4|text|llava --src=PATH --out=DIR
                 [--image_root=DIR] [--split=train] [--tag=NAME] [--num_shards=8] [--tokenizer=SPEC]
                 [--held_out=PATH] [--num_workers=N] [Beam options: --runner=DataflowRunner ...]

reads every record of PATH (`mm1_jax.data.formats`), checks it, leaves out held-out
evaluation images and exact duplicates, and writes the usable records as the TFDS split
`<split>_<tag>` of the dataset `mm1_<kind>` under DIR, in ArrayRecord form
(`mm1_jax.data.tfds_layout`: `tfds.data_source` loads it, and `sources.TfdsCorpusSource`,
a seqio.TfdsDataSource, makes it a task; register the folder with `sources.register_corpus`). The work is an Apache Beam pipeline
(`mm1_jax.data.beam_build`): the DirectRunner in this process by default, in
--num_workers processes, or on Dataflow with Beam's options (docs/data.md). DIR may be a
bucket (gs://...; the grain loader reads ArrayRecord from gs:// directly).
It prints one JSON line:

  {"written": {"caption": n}, "images_written": n, "skipped": {reason: n},
   "images_dropped": {reason: n}, "truncated_documents": n,
   "interleaved_over_16_images": n, "held_out_digests": n, "out": DIR,
   "tfds": {"name": "mm1_caption", "version": "1.0.0", "split": "train_cc3m", "shards": n}}

and keeps the same report in the dataset's metadata.json and in DIR/build.json. Records
are never fatal: each unusable one is counted under its reason (`formats.REASONS`).

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
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from mm1_jax import paths
from mm1_jax.data import formats, inspect_data, tfds_layout


KIND_OF = {"webdataset": "caption", "coco": "caption", "obelics": "interleaved", "mmc4": "interleaved",
           "text": "text", "llava": "chat"}
# Images kept per interleaved document at build time (more are cut, as `truncated_documents`):
# the loaders split long documents, so this only bounds the size of one record.
DOCUMENT_MAX_IMAGES = 64
BUILD_CHECKS = formats.Checks(max_images=DOCUMENT_MAX_IMAGES)
_HEX = re.compile(r"^[0-9a-f]{64}$")


def held_out_digests(spec: str | Path | None) -> frozenset[str]:
  """SHA-256 digests of the images a build must leave out (`mm1_jax.eval.overlap.digest`):
  a text file of hex digests (one per line), a folder of image files, or TFRecord files
  of tf.train.Examples with "image"/"images" features (the eval sets), or a folder of them."""
  if not spec:
    return frozenset()
  root = Path(spec)
  if not root.exists():
    raise FileNotFoundError(f"--held_out {root} does not exist")
  files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  found: set[str] = set()
  for f in files:
    if ".tfrecord" in f.name:
      import tensorflow as tf  # noqa: PLC0415  (eval records: only with --held_out)

      for raw in tf.data.TFRecordDataset(str(f)).as_numpy_iterator():
        feats = tf.train.Example.FromString(raw).features.feature
        for name in ("image", "images"):
          if name in feats:
            found.update(hashlib.sha256(v).hexdigest() for v in feats[name].bytes_list.value)
    elif f.suffix.lower() in formats.IMAGE_EXTS:
      found.add(hashlib.sha256(f.read_bytes()).hexdigest())
    elif root.is_file():
      lines = [line.strip().lower() for line in f.read_text().splitlines() if line.strip()]
      bad = next((line for line in lines if not _HEX.match(line)), None)
      if bad is not None:
        raise ValueError(f"--held_out {f}: {bad!r} is not a SHA-256 hex digest")
      found.update(lines)
  return frozenset(found)


def build(fmt: str, src: str | Path, out: str | Path, *, image_root: str | Path | None = None,
          split: str = "train", tag: str | None = None, num_shards: int = 8,
          checks: formats.Checks = BUILD_CHECKS, progress: bool = True, overwrite: bool = False,
          tokenizer: str | None = None, held_out: str | Path | None = None, num_workers: int = 1,
          beam_args: list[str] | None = None) -> dict:
  """Builds one source into the TFDS split `<split>_<tag>` of its kind's dataset under
  `out` (`mm1_jax.data.tfds_layout`) on Apache Beam (`mm1_jax.data.beam_build`); returns the report.

  Several sources of one kind (CC3M and COYO captions, say) share a corpus under
  different tags (default: the format's name); a task reads all tags of its split.
  tokenizer: a vocabulary (`vocabulary.load`) to count the interleaved documents longer
  than one MM1 sequence in tokens too (see the module doc). held_out: images to leave
  out (`held_out_digests`). num_workers: DirectRunner workers; beam_args: Beam's own
  options (`--runner=DataflowRunner ...`), which then decide.
  """
  from mm1_jax.data import beam_build  # noqa: PLC0415  (apache_beam: only when building)

  kind = KIND_OF[fmt]
  tag = tag or fmt
  name = tfds_layout.split_name(split, tag)
  folder = tfds_layout.dataset_dir(out, kind)
  meta = tfds_layout.read_metadata(out, kind).get("splits", {})
  previous = meta.get(name, {}).get("shard_lengths", [])
  if name in meta and not overwrite:
    raise FileExistsError(f"{folder} already has the split {name}; pass --overwrite to replace it")
  units = formats.units(fmt, Path(src), Path(image_root) if image_root else None)
  held = held_out_digests(held_out)
  staging = folder / f".staging-{uuid.uuid4().hex[:12]}"
  # Worker processes on this machine hand records over through local files rather than
  # through the runner's shuffle, which would carry every image through one process.
  spill = tempfile.mkdtemp(prefix="mm1-spill-") if num_workers > 1 and not beam_args else None
  spec = beam_build.Spec(kind, checks, held, num_shards, str(staging), tokenizer, progress, spill)
  try:
    counters = beam_build.run(units, spec, beam_build.pipeline_options(num_workers, beam_args))
    staged = _staged(staging)
    lengths = [count for _, count, _ in staged]
    report = _report(fmt, src, split, tag, kind, counters, lengths, held, tokenizer, out, name)
    if staged:  # with no usable record the dataset is left as it was
      placed = _move(staged, folder, kind, name)
      meta[name] = {"split": split, "tag": tag, "shard_lengths": lengths, "build": report}
      tfds_layout.write_metadata(out, kind, {k: v["shard_lengths"] for k, v in meta.items()}, meta)
      _forget_cached_builders()
      for i in range(len(previous)):  # the split's old shards that no new one replaced, last
        stale = folder / tfds_layout.shard_name(kind, name, i, len(previous))
        if stale.name not in placed and stale.exists():
          stale.unlink()
    else:
      print(f"mm1-data: nothing usable in {src}: {folder} is unchanged", file=sys.stderr)
  finally:
    if staging.exists():
      staging.rmtree()
    if spill:
      shutil.rmtree(spill, ignore_errors=True)

  log = paths.path(out) / "build.json"
  history = json.loads(log.read_text()) if log.exists() else {}
  history[f"{kind}/{name}"] = report
  paths.write_text_atomic(log, json.dumps(history, indent=2) + "\n")
  return report


def _report(fmt, src, split, tag, kind, counters, lengths, held, tokenizer, out, name) -> dict:
  def by(prefix):
    return {k[len(prefix):]: v for k, v in sorted(counters.items()) if k.startswith(prefix) and v}

  report = {"format": fmt, "src": str(src), "split": split, "tag": tag,
            "written": {kind: sum(lengths)} if sum(lengths) else {}, "images_written": counters.get("images_written", 0),
            "skipped": by("skipped/"), "images_dropped": by("images_dropped/"),
            "truncated_documents": counters.get("truncated_documents", 0),
            "interleaved_over_16_images": counters.get("interleaved_over_16_images", 0)}
  if tokenizer:
    report.update({k: counters.get(k, 0) for k in ("interleaved_over_4096_tokens_or_16_images",
                                                   "interleaved_examples_at_mm1_shapes")})
  report.update(held_out_digests=len(held), out=str(paths.path(out)),
                tfds={"name": tfds_layout.dataset_name(kind), "version": tfds_layout.VERSION, "split": name,
                      "shards": len(lengths)})
  return report


def _staged(staging) -> list[tuple[int, int, object]]:
  """(shard index, records, path) of each shard the writers finished, in shard order."""
  out = []
  for f in staging.glob("shard-*-n*.array_record") if staging.exists() else ():
    index, count = f.name[len("shard-"):-len(".array_record")].split("-n")
    out.append((int(index), int(count), f))
  return sorted(out)


def _move(staged, folder, kind: str, name: str) -> set[str]:
  """Moves the staged shards into place, numbered in shard order (shards that got no
  record are left out); returns their names."""
  placed = set()
  for i, (_, _, f) in enumerate(staged):
    target = folder / tfds_layout.shard_name(kind, name, i, len(staged))
    if paths.is_remote(target):
      f.copy(target, overwrite=True)
      f.unlink()
    else:
      os.replace(f, target)
    placed.add(target.name)
  return placed


def _forget_cached_builders() -> None:
  """seqio keeps one TFDS builder (and its split list) per dataset for the process: drop
  them, so that a split built now is seen by sources made later in this process."""
  seqio = sys.modules.get("seqio")
  if seqio is not None:
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()  # noqa: SLF001


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mm1-data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="real corpus format -> a TFDS dataset of ArrayRecord shards (Apache Beam)",
                     description="Options this parser does not know are Beam's pipeline options "
                     "(--runner=DataflowRunner --project=... --region=... --temp_location=gs://...).\n\n"
                     "Skip reasons:\n" + "\n".join(f"  {k:16s} {v}" for k, v in formats.REASONS.items()),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  b.add_argument("--format", required=True, choices=formats.FORMATS)
  b.add_argument("--src", required=True, help="a file or a folder of files in that format")
  b.add_argument("--out", required=True, help="corpus folder, local or a bucket (gs://...); the TFDS datasets mm1_<kind>/ go here")
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
  b.add_argument("--held_out", default=None, help="images never to train on: a file of SHA-256 hex digests, a "
                 "folder of images, or TFRecord eval sets (files or a folder); they are dropped as held_out_image")
  b.add_argument("--num_workers", type=int, default=1, help="DirectRunner worker processes (1: in this process); "
                 "ignored when a Beam --runner is given")
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
  args, beam_args = parser.parse_known_args(argv)
  if args.command == "inspect" or not beam_args:
    args = parser.parse_args(argv)  # unknown flags are errors, except Beam's options to `build`
  from mm1_jax.data import beam_build  # noqa: PLC0415  (apache_beam: only when building)

  unknown = beam_build.unknown_options(beam_args)
  if unknown:
    b.error(f"unrecognized arguments (neither mm1-data build's nor Beam's pipeline options): {' '.join(unknown)}")
  if args.command == "inspect":
    return _inspect(args)
  checks = formats.Checks(args.min_image_size, args.max_images, args.max_image_side)
  try:
    report = build(args.format, args.src, args.out, image_root=args.image_root, split=args.split, tag=args.tag,
                   num_shards=args.num_shards, checks=checks, progress=not args.no_progress,
                   overwrite=args.overwrite, tokenizer=args.tokenizer, held_out=args.held_out,
                   num_workers=args.num_workers, beam_args=beam_args)
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
