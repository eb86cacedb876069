"""Loader throughput: the grain loader on an MM1-shaped mixture of JPEG shards.

Builds a small corpus in the real formats (webdataset caption tars, OBELICS-style
interleaved JSONL with image files, text JSONL) with JPEG images of a typical web size,
converts it with `mm1-data build`, registers it as a 45:45:10 mixture and times
`loader.make_loader` at MM1's shapes: 378 px images, 144 tokens per image, sequences of
4096 tokens with up to 16 images. Writes one JSON record.

  python benchmarks/loader.py --json_out=benchmarks/results/loader_cpu_2core.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
  from PIL import Image

  from mm1_jax.data import shapes_world as sw

  scene = sw.caption_example(0, seed, 64)
  img = Image.fromarray(scene["image"]).resize(size, Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_sources(root: Path, n_caption: int, n_docs: int, n_text: int, size: tuple[int, int]) -> None:
  from mm1_jax.data import shapes_world as sw

  (root / "wds").mkdir(parents=True)
  with tarfile.open(root / "wds" / "shard-000000.tar", "w") as tar:
    for i in range(n_caption):
      ex = sw.caption_example(0, i, 64)
      for name, data in ((f"{i:06d}.jpg", _jpeg(i, size)), (f"{i:06d}.txt", ex["caption"].encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  (root / "images").mkdir()
  with open(root / "docs.jsonl", "w") as f:
    for d in range(n_docs):
      texts, images = [], []
      for j in range(6):  # 6 images and 6 paragraphs a document
        name = f"d{d}_{j}.jpg"
        (root / "images" / name).write_bytes(_jpeg(10_000 + d * 6 + j, size))
        texts += [None, " ".join(sw.text_example(0, d * 6 + j)["text"].split()[:60])]
        images += [name, None]
      f.write(json.dumps({"texts": texts, "images": images}) + "\n")
  with open(root / "text.jsonl", "w") as f:
    for i in range(n_text):
      f.write(json.dumps({"text": " ".join(sw.text_example(1, i)["text"] for _ in range(8))}) + "\n")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=378)
  p.add_argument("--source_size", default="500x375", help="JPEG size in the shards, WxH")
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--max_images", type=int, default=16)
  p.add_argument("--tokens_per_image", type=int, default=144)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--num_threads", type=int, default=2)
  p.add_argument("--batches", type=int, default=10, help="timed batches")
  p.add_argument("--records", type=int, default=400, help="caption pairs (documents: a quarter of it)")
  p.add_argument("--json_out", default=None, help="write the run's record (benchmarks/record.py) here")
  args = p.parse_args(argv)
  from benchmarks import record as record_lib

  git = record_lib.git_state()

  from mm1_jax.data import build, loader, pipeline, sources
  from tasks import shapes

  size = tuple(int(x) for x in args.source_size.split("x"))
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    t0 = time.perf_counter()
    make_sources(root / "src", args.records, args.records // 4, args.records // 4, size)
    out = root / "corpus"
    reports = [build.build("webdataset", root / "src" / "wds", out, progress=False),
               build.build("obelics", root / "src" / "docs.jsonl", out, image_root=root / "src" / "images",
                           progress=False),
               build.build("text", root / "src" / "text.jsonl", out, progress=False)]
    build_s = time.perf_counter() - t0
    sources.register_corpus("bench", out, image_size=args.image_size, output_features=shapes.OUTPUT_FEATURES)
    cfg = pipeline.DataConfig(mixture_or_task_name="bench_pretrain", batch_size=args.batch_size,
                              seq_len=args.seq_len, max_images=args.max_images, module_imports=(),
                              num_threads=args.num_threads)
    it = loader.make_loader(cfg, tokens_per_image=args.tokens_per_image, image_size=args.image_size)
    next(it)  # warm-up: thread pool and prefetch buffer
    t0 = time.perf_counter()
    seqs = images = tokens = pad = 0
    for _ in range(args.batches):
      b = next(it)
      seqs += b["tokens"].shape[0]
      images += int((b["images"].reshape(b["images"].shape[0], b["images"].shape[1], -1).max(-1) > 0).sum())
      tokens += int((b["segment_ids"] > 0).sum())
      pad += int((b["segment_ids"] == 0).sum())
    dt = time.perf_counter() - t0
  cores = os.cpu_count() or 1
  record = {
      "machine": f"{platform.machine()}, {cores} cores", "python": platform.python_version(),
      "image_size": args.image_size, "source_jpeg": args.source_size, "seq_len": args.seq_len,
      "max_images": args.max_images, "tokens_per_image": args.tokens_per_image,
      "batch_size": args.batch_size, "num_threads": args.num_threads, "timed_batches": args.batches,
      "sequences_per_s": seqs / dt, "images_per_s": images / dt, "tokens_per_s": tokens / dt,
      "sequences_per_s_per_core": seqs / dt / cores, "images_per_s_per_core": images / dt / cores,
      "images_per_sequence": images / seqs, "padding_fraction": pad / (pad + tokens),
      "build_s": build_s, "build_reports": reports,
  }
  print(json.dumps({k: v for k, v in record.items() if k != "build_reports"}, indent=1))
  if args.json_out:
    from benchmarks import record as record_lib

    record_lib.write(Path(args.json_out).resolve(), "loader", record, git=git)
  return record


if __name__ == "__main__":
  main()
