"""Build throughput: `mm1-data build` in records/s, the single-process builder against the Beam pipeline.

Writes webdataset input (caption pairs in --tars tar shards) and OBELICS input
(documents of 6 images and 6 paragraphs in --doc_files JSONL files, images as files),
with JPEGs of a typical web size (benchmarks/loader.py's sources), then builds each
format with three builders:

  baseline  the single-process builder of --baseline (default fb1bd2c, the last commit
            before the Beam pipeline), from a temporary `git worktree` of that commit;
            it writes the old layout <out>/<kind>/<split>-<tag>-*.array_record
  beam_1    this checkout's build: the Beam pipeline on the DirectRunner in its process
  beam_2    the same with num_workers=2: the DirectRunner's worker processes

Every build runs in a fresh process that imports mm1_jax from its own tree, so each pays
the same process start and imports. Inside it, mm1_jax.data.build, TensorFlow (both
use it: the baseline to serialise records, the Beam build for the TFDS metadata) and PIL
are imported first (import_s); then a first build of a tiny source of the same format
(warmup_s) pays what only a process's first build pays (apache_beam and
tensorflow_datasets imports, Beam's first pipeline); then the build() call is timed
(build_s): it reads every record, decodes every image and checks it, and writes the
shards; for beam_2 it includes starting the worker processes, which every pipeline
starts anew. process_s is the whole process.

The builders alternate over --rounds (baseline, beam_1, beam_2 in even rounds; the
reverse in odd ones); the record gives per format and builder the median records/s
(records read, written or skipped, / build_s), the same over process_s, and the ratios
beam_1 / baseline and beam_2 / beam_1. Every build of a format must report the same
counts (written, skipped and dropped by reason), or the run fails.

  python benchmarks/build_throughput.py --json_out=build/cpu_2core.json   # under benchmarks/results/
  python benchmarks/build_throughput.py --short          # tiny sizes: only that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASELINE = "fb1bd2c"  # the single-process builder, before `mm1-data build` ran on Beam
FORMATS = ("webdataset", "obelics")
VARIANTS = ("baseline", "beam_1", "beam_2")
NUM_WORKERS = {"baseline": None, "beam_1": 1, "beam_2": 2}


def worker(spec: dict) -> None:
  """One build in this fresh process, with the code of spec["code"] (see the module doc)."""
  from benchmarks.loader import use_code

  files = use_code(spec["code"])
  t0 = time.perf_counter()
  import PIL.Image  # noqa: F401, PLC0415  (both builders decode every image with PIL)
  import tensorflow  # noqa: F401, PLC0415  (the baseline serialises with it; the Beam build writes TFDS metadata with it)

  from mm1_jax.data import build  # noqa: PLC0415

  import_s = time.perf_counter() - t0
  extra = {} if spec["num_workers"] is None else {"num_workers": spec["num_workers"]}
  # A first, tiny build of the same format pays what any first build in a process pays
  # (the builder's own imports, Beam's first pipeline); the timed build comes after it.
  t0 = time.perf_counter()
  build.build(spec["format"], spec["warmup"]["src"], spec["out"] + "-warmup", image_root=spec["warmup"].get("image_root"),
              num_shards=1, progress=False, **extra)
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  report = build.build(spec["format"], spec["src"], spec["out"], image_root=spec.get("image_root"),
                       num_shards=spec["num_shards"], progress=False, **extra)
  build_s = time.perf_counter() - t0
  Path(spec["result"]).write_text(json.dumps({"report": report, "build_s": build_s, "import_s": import_s,
                                              "warmup_s": warmup_s, "imported": files}))


def records_read(report: dict) -> int:
  """Records a build read: written or skipped."""
  return sum(report["written"].values()) + sum(report["skipped"].values())


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--records", type=int, default=None,
                 help="webdataset caption pairs; OBELICS documents: a quarter of it (default 8000, --short 24)")
  p.add_argument("--tars", type=int, default=8, help="webdataset tar shards")
  p.add_argument("--doc_files", type=int, default=4, help="OBELICS JSONL files")
  p.add_argument("--source_size", default="500x375", help="JPEG size in the sources, WxH")
  p.add_argument("--num_shards", type=int, default=8, help="output shards of every build")
  p.add_argument("--rounds", type=int, default=2, help="builds of each format by each builder")
  p.add_argument("--baseline", default=BASELINE, help="the commit whose single-process builder is the baseline")
  p.add_argument("--short", action="store_true", help="tiny sizes: checks that it runs")
  p.add_argument("--json_out", default=None, help="write the run's record (benchmarks/record.py) here")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one build (JSON)
  args = p.parse_args(argv)
  if args.worker:
    worker(json.loads(args.worker))
    return {}
  from benchmarks import loader as loader_bench
  from benchmarks import record as record_lib

  git = record_lib.git_state()
  n = args.records or (24 if args.short else 8000)
  n_docs = n // 4
  size = tuple(int(x) for x in args.source_size.split("x"))
  commit = loader_bench.git_commit(args.baseline)
  code = {"beam_1": REPO, "beam_2": REPO}
  script = Path(__file__).resolve()
  cores = os.cpu_count() or 1
  runs = {(f, v): [] for f in FORMATS for v in VARIANTS}
  with tempfile.TemporaryDirectory() as tmp, loader_bench.worktree(commit) as base:
    code["baseline"] = base
    root = Path(tmp)
    t0 = time.perf_counter()
    srcs = loader_bench.make_sources(root / "src", n, n_docs, 0, size, tars=args.tars, doc_files=args.doc_files,
                                     workers=cores)
    warm = loader_bench.make_sources(root / "warm", 16, 4, 0, size)
    source_s = time.perf_counter() - t0
    print(f"sources: {n} caption pairs in {args.tars} tars, {n_docs} documents in {args.doc_files} JSONL files "
          f"({source_s:.0f} s)", file=sys.stderr, flush=True)
    for r in range(args.rounds):
      for fmt in FORMATS:
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
          out = root / "out" / f"{r}-{fmt}-{v}"
          spec = {"format": fmt, **srcs[fmt], "out": str(out), "num_shards": args.num_shards,
                  "num_workers": NUM_WORKERS[v], "warmup": warm[fmt]}
          res = loader_bench.run_worker(script, code[v], spec, root)
          shutil.rmtree(out, ignore_errors=True)
          shutil.rmtree(f"{out}-warmup", ignore_errors=True)
          runs[fmt, v].append(res)
          k = records_read(res["report"])
          print(f"round {r} {fmt:10s} {v:8s} {k / res['build_s']:7.1f} records/s (build {res['build_s']:.1f} s, "
                f"process {res['process_s']:.1f} s)", file=sys.stderr, flush=True)

  figures = {"baseline_commit": commit, "rounds": args.rounds, "caption_pairs": n, "documents": n_docs,
             "images_per_document": 6, "tars": args.tars, "doc_files": args.doc_files,
             "source_jpeg": args.source_size, "num_shards": args.num_shards, "source_s": source_s}
  for fmt in FORMATS:
    counts = loader_bench.check_counts(
        {f"{v} round {i}": res["report"] for v in VARIANTS for i, res in enumerate(runs[fmt, v])}, fmt)
    k = records_read(runs[fmt, VARIANTS[0]][0]["report"])
    figures[f"{fmt}.records"] = k
    figures[f"{fmt}.counts"] = counts
    for v in VARIANTS:
      rs = runs[fmt, v]
      figures[f"{fmt}.{v}.records_per_s"] = statistics.median(k / r["build_s"] for r in rs)
      figures[f"{fmt}.{v}.images_per_s"] = statistics.median(r["report"]["images_written"] / r["build_s"] for r in rs)
      figures[f"{fmt}.{v}.process_records_per_s"] = statistics.median(k / r["process_s"] for r in rs)
      figures[f"{fmt}.{v}.build_s_runs"] = [r["build_s"] for r in rs]
      figures[f"{fmt}.{v}.process_s_runs"] = [r["process_s"] for r in rs]
      figures[f"{fmt}.{v}.import_s_median"] = statistics.median(r["import_s"] for r in rs)
      figures[f"{fmt}.{v}.warmup_s_median"] = statistics.median(r["warmup_s"] for r in rs)
    for a, b in (("beam_1", "baseline"), ("beam_2", "beam_1")):
      figures[f"{fmt}.ratio.{a}/{b}"] = figures[f"{fmt}.{a}.records_per_s"] / figures[f"{fmt}.{b}.records_per_s"]
      figures[f"{fmt}.process_ratio.{a}/{b}"] = (figures[f"{fmt}.{a}.process_records_per_s"]
                                                 / figures[f"{fmt}.{b}.process_records_per_s"])
  figures["imported"] = {v: runs[FORMATS[0], v][0]["imported"]["mm1_jax"] for v in VARIANTS}
  figures["left_out"] = (
      "source generation (source_s), each build process's start and first imports (import_s; in "
      "process_s) and a first build of 16 caption pairs or 4 documents in the same process (warmup_s: "
      "for the Beam builds, importing apache_beam and tensorflow_datasets and Beam's first pipeline; in "
      "process_s); records_per_s is over build_s, the timed build() call after it, which includes for "
      "beam_2 starting its worker processes (they are started anew for every pipeline). Every builder "
      "reads every record, decodes and checks every image and writes the "
      "records as ArrayRecord shards; the baseline writes the old layout, the Beam builds a TFDS dataset "
      "(and also hash every record to drop exact duplicates; the sources have none)")
  summary = {k: v for k, v in figures.items() if not isinstance(v, (dict, list, str))}
  print(json.dumps(summary, indent=1))
  if args.json_out:
    record_lib.write(args.json_out, "build_throughput", figures, git=git, short=args.short,
                     baseline={"commit": commit, "code": "a git worktree of the commit: its mm1_jax.data.build"},
                     variants={"baseline": "build() of the baseline commit (single process)",
                               "beam_1": "build(..., num_workers=1): Beam DirectRunner, in process",
                               "beam_2": "build(..., num_workers=2): Beam DirectRunner, 2 worker processes"})
  return figures


if __name__ == "__main__":
  main()
