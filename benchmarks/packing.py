"""Packing: the padding and image slots of the grain loader's rows, next-fit against first fit
over more open rows (`pipeline.DataConfig.pack_rows`).

Data sets, each at the shapes of the runs that read it:

  quickstart      the bundled shapes-world mixture (interleaved 45 : caption 45 : text 10, a
                  share of records) at gin/experiments/quickstart.gin's shapes: 128-token
                  sequences, up to 4 images of 16 tokens (64 px), batches of 16
  mm1_fixed       benchmarks/loader.py's corpus in the real formats (webdataset caption pairs,
                  OBELICS-style documents of 6 images and 6 paragraphs, text documents) mixed
                  45:45:10 by records, at MM1's shapes: 4096 tokens, up to 16 images of 144
                  tokens (378 px), batches of 8
  mm1_published   the same formats with lengths and image counts drawn around published means
                  (`loader.make_published_sources`: OBELICS's 2.5 images and 815 text tokens a
                  document, LAION's 26.7 tokens a caption, 500-token text documents) mixed
                  45:45:10 by tokens, as the MM1 pod files do (RATE_UNIT = "tokens")

For each --rows value the loader (`loader.make_loader`) yields --batches batches from the
same seed; padding is the share of positions that hold no example, images a sequence the
image slots in use. A row's budgets are its positions and its image slots: when the image
cap ends rows before their positions do, no packing order lowers the padding (the record
gives each task's mean ids and images an example to check that by hand).

  python -m benchmarks.packing --json_out=packing/cpu.json   # under benchmarks/results/
  python -m benchmarks.packing --short                       # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

QUICKSTART = dict(mixture="mm1_shapes_pretrain", seq_len=128, max_images=4, tokens_per_image=16, image_size=64,
                  batch_size=16, rates={"mm1_shapes_interleaved": 45, "mm1_shapes_caption": 45,
                                        "mm1_shapes_text": 10}, rate_unit="records")
MM1 = dict(seq_len=4096, max_images=16, tokens_per_image=144, image_size=378, batch_size=8, rates=None)
DATA_SETS = {"quickstart": QUICKSTART,
             "mm1_fixed": dict(MM1, mixture="fixed_pretrain", rate_unit="records"),
             "mm1_published": dict(MM1, mixture="published_pretrain", rate_unit="tokens")}


def measure(shapes: dict, rows: int, batches: int) -> dict:
  """Padding and images a sequence of `batches` batches of the grain loader."""
  from mm1_jax.data import loader, pipeline

  cfg = pipeline.DataConfig(mixture_or_task_name=shapes["mixture"], batch_size=shapes["batch_size"],
                            seq_len=shapes["seq_len"], max_images=shapes["max_images"],
                            mixture_rates=shapes["rates"], rate_unit=shapes["rate_unit"], pack_rows=rows,
                            num_threads=2, module_imports=("tasks",))
  it = loader.make_loader(cfg, tokens_per_image=shapes["tokens_per_image"], image_size=shapes["image_size"])
  pad = positions = images = sequences = segments = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    seg = b["segment_ids"]
    pad += int((seg == 0).sum())
    positions += seg.size
    segments += int(seg.max(axis=1).sum())
    images += int((b["images"].reshape(b["images"].shape[0], b["images"].shape[1], -1).max(-1) > 0).sum())
    sequences += seg.shape[0]
  return {"pack_rows": rows, "padding_fraction": pad / positions, "images_per_sequence": images / sequences,
          "examples_per_sequence": segments / sequences, "sequences": sequences,
          "seconds": time.perf_counter() - t0}


def record_sizes(shapes: dict, n: int) -> dict:
  """Per task: mean ids (each image as its tokens) and images of the first n examples drawn."""
  import collections

  import numpy as np

  from mm1_jax.data import loader, pipeline

  cfg = pipeline.DataConfig(mixture_or_task_name=shapes["mixture"], batch_size=shapes["batch_size"],
                            seq_len=shapes["seq_len"], max_images=shapes["max_images"],
                            mixture_rates=shapes["rates"], rate_unit=shapes["rate_unit"],
                            module_imports=("tasks",))
  mixed, names, _ = loader.mixed_examples(cfg, tokens_per_image=shapes["tokens_per_image"],
                                          image_size=shapes["image_size"])
  it = iter(mixed.to_iter_dataset())
  sizes = collections.defaultdict(list)
  for _ in range(n):
    record = next(it)
    if isinstance(record, loader.Skipped):
      continue
    for ex in record:
      sizes[names[ex["task"]]].append((len(ex["text"]) - 1, len(ex["images"])))
  return {task: {"examples": len(v), "mean_ids": float(np.mean([s[0] for s in v])),
                 "mean_images": float(np.mean([s[1] for s in v]))} for task, v in sorted(sizes.items())}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="1,2,4,8,16", help="comma-separated pack_rows values")
  p.add_argument("--data_sets", default=",".join(DATA_SETS), help="comma-separated, of: " + ", ".join(DATA_SETS))
  p.add_argument("--batches", type=int, default=60, help="batches measured per data set and rows value")
  p.add_argument("--records", type=int, default=400, help="mm1 data set: caption pairs (documents and "
                 "text: a quarter of it each, as benchmarks/loader.py)")
  p.add_argument("--short", action="store_true", help="tiny sizes: checks that it runs")
  p.add_argument("--json_out", default=None, help="write the run's record here (under benchmarks/results/ "
                 "if relative)")
  args = p.parse_args(argv)
  from tqdm import tqdm

  from benchmarks import loader as loader_bench
  from benchmarks import record as record_lib
  from mm1_jax.data import corpus, sources
  from tasks import shapes as shapes_tasks

  git = record_lib.git_state()
  rows = [int(r) for r in args.rows.split(",")]
  batches, records = (2, 16) if args.short else (args.batches, args.records)
  corpus.ensure_corpus(spec=shapes_tasks.CORPUS_SPEC, progress=False)
  figures: dict = {"batches": batches, "mm1_corpus_records": {"caption": records, "interleaved": records // 4,
                                                               "text": records // 4}, "data_sets": {}}
  names = args.data_sets.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    for prefix, make in (("fixed", loader_bench.make_sources), ("published", loader_bench.make_published_sources)):
      if f"mm1_{prefix}" in names:
        srcs = make(Path(tmp) / prefix / "src", records, records // 4, records // 4, (500, 375))
        loader_bench.build_corpus(srcs, Path(tmp) / prefix / "corpus")
        sources.register_corpus(prefix, Path(tmp) / prefix / "corpus", image_size=MM1["image_size"],
                                output_features=shapes_tasks.OUTPUT_FEATURES)
    for name in names:
      shapes = DATA_SETS[name]
      figures["data_sets"][name] = {"shapes": {k: v for k, v in shapes.items() if k != "rates"},
                                    "rates": shapes["rates"], "records": record_sizes(shapes, 200), "runs": []}
    if "mm1_published" in names:
      figures["published_means"] = loader_bench.PUBLISHED
    runs = [(name, r) for name in names for r in rows]
    for name, r in tqdm(runs, desc="loader runs", disable=args.short):
      figures["data_sets"][name]["runs"].append(measure(DATA_SETS[name], r, batches))
  for name, d in figures["data_sets"].items():
    for run in d["runs"]:
      print(f"{name:10s} pack_rows {run['pack_rows']:3d}: padding {run['padding_fraction']:.3f}, "
            f"{run['images_per_sequence']:.2f} images and {run['examples_per_sequence']:.2f} examples a sequence")
  if args.json_out:
    record_lib.write(args.json_out, "packing", figures, git=git)
  return figures


if __name__ == "__main__":
  main()
