"""Loader throughput: the grain loader on an MM1-shaped mixture of JPEG shards.

Builds a small corpus in the real formats (webdataset caption tars, OBELICS-style
interleaved JSONL with image files, text JSONL) with JPEG images of a typical web size,
converts it with `mm1-data build`, registers it as a 45:45:10 mixture and times
`loader.make_loader` at MM1's shapes: 378 px images, 144 tokens per image, sequences of
4096 tokens with up to 16 images. Writes one JSON record.

  python benchmarks/loader.py --json_out=benchmarks/results/loader_cpu_2core.json

Before and after a change of the data code, on the same sources:

  python benchmarks/loader.py --compare_baseline=COMMIT --batches=40 \\
      --json_out=benchmarks/results/loader/compare_cpu_378px.json

checks COMMIT out into a temporary `git worktree` and runs everything twice, side by
side: the build and the loader of COMMIT (with the corpus layout its build writes) and
those of this checkout. Every build and every timing runs in a fresh process importing
mm1_jax from its own tree; the timings alternate over --rounds (baseline first in even
rounds, current first in odd ones) and the record gives the median of each and their
ratio (current / baseline). Both builds must report the same counts, or the run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# --- sources --------------------------------------------------------------------------------

def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
  from PIL import Image

  from mm1_jax.data import shapes_world as sw

  scene = sw.caption_example(0, seed, 64)
  img = Image.fromarray(scene["image"]).resize(size, Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _jpegs(seeds: list[int], size: tuple[int, int], workers: int) -> list[bytes]:
  """JPEGs of `seeds`, in order; in `workers` fresh processes when more than one."""
  if workers <= 1 or len(seeds) < 64:
    return [_jpeg(s, size) for s in seeds]
  import concurrent.futures  # noqa: PLC0415
  import multiprocessing  # noqa: PLC0415

  # spawn, not fork: the caller may have loaded TensorFlow, whose threads do not survive a fork
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(functools.partial(_jpeg, size=size), seeds, chunksize=32))


def _parts(n: int, k: int) -> list[range]:
  """0..n-1 in k consecutive, near-equal ranges."""
  k = max(1, min(k, n)) if n else 1
  return [range(i * n // k, (i + 1) * n // k) for i in range(k)]


def _add_pair(tar: tarfile.TarFile, i: int, jpeg: bytes, caption: str) -> None:
  """Caption pair i as webdataset members: <i>.jpg and <i>.txt."""
  for name, data in ((f"{i:06d}.jpg", jpeg), (f"{i:06d}.txt", caption.encode())):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sources(root: Path, n_caption: int, n_docs: int, n_text: int, size: tuple[int, int], *,
                 tars: int = 1, doc_files: int = 1, workers: int = 1) -> dict[str, dict]:
  """Writes the three sources under `root`: `wds/` (n_caption caption pairs in `tars` tar
  shards), `docs.jsonl` or, with doc_files > 1, `docs/` (n_docs OBELICS documents of 6
  images and 6 paragraphs, images in `images/`), and `text.jsonl`. Images are JPEGs of
  `size` (W, H), encoded in `workers` processes. Returns {format: build() arguments}."""
  from mm1_jax.data import shapes_world as sw

  (root / "wds").mkdir(parents=True)
  pixels = _jpegs(list(range(n_caption)), size, workers)
  for s, part in enumerate(_parts(n_caption, tars)):
    with tarfile.open(root / "wds" / f"shard-{s:06d}.tar", "w") as tar:
      for i in part:
        _add_pair(tar, i, pixels[i], sw.caption_example(0, i, 64)["caption"])
  (root / "images").mkdir()
  pixels = _jpegs([10_000 + d * 6 + j for d in range(n_docs) for j in range(6)], size, workers)
  if doc_files > 1:
    (root / "docs").mkdir()
    doc_paths = [root / "docs" / f"docs-{k:05d}.jsonl" for k in range(doc_files)]
  else:
    doc_paths = [root / "docs.jsonl"]
  for path, part in zip(doc_paths, _parts(n_docs, len(doc_paths))):
    with open(path, "w") as f:
      for d in part:
        texts, images = [], []
        for j in range(6):  # 6 images and 6 paragraphs a document
          name = f"d{d}_{j}.jpg"
          (root / "images" / name).write_bytes(pixels[d * 6 + j])
          texts += [None, " ".join(sw.text_example(0, d * 6 + j)["text"].split()[:60])]
          images += [name, None]
        f.write(json.dumps({"texts": texts, "images": images}) + "\n")
  with open(root / "text.jsonl", "w") as f:
    for i in range(n_text):
      f.write(json.dumps({"text": " ".join(sw.text_example(1, i)["text"] for _ in range(8))}) + "\n")
  return {"webdataset": {"src": str(root / "wds")},
          "obelics": {"src": str(root / ("docs" if doc_files > 1 else "docs.jsonl")), "image_root": str(root / "images")},
          "text": {"src": str(root / "text.jsonl")}}


# Published means of web-scale sources, for corpora shaped like them (`make_published_sources`):
# OBELICS (dataset card): 141M documents, 353M images, 115B text tokens: 2.5 images and 815
# text tokens a document. LAION-2B-en as IDEFICS's model card counts it: 1.120B image-text
# pairs, 29.9B tokens: 26.7 tokens a caption. C4 en (dataset card): 364.9M documents,
# 828.6 GB with their url and timestamp: about 2,270 bytes a document, taken as 500 tokens
# (about 4.5 bytes a token, an assumption). The distributions around these means are not
# published; the ones below are chosen: 1 + Poisson(1.5) images a document, log-normal
# lengths (sigma 0.6 for documents and text, 0.5 for captions).
PUBLISHED = {"doc_images": 2.5, "doc_text_tokens": 815, "caption_tokens": 26.7, "text_tokens": 500,
             "sigma_doc": 0.6, "sigma_caption": 0.5, "sigma_text": 0.6}


def _words(rng, tokens: float, sigma: float, pool: list[str], tokens_per_word: float) -> str:
  """About `tokens` tokens (log-normal around it) of words from `pool`, in order from a
  random start."""
  n = max(1, round(rng.lognormal(np.log(tokens) - sigma ** 2 / 2, sigma) / tokens_per_word))
  start = int(rng.integers(len(pool)))
  return " ".join(pool[(start + i) % len(pool)] for i in range(n))


def make_published_sources(root: Path, n_caption: int, n_docs: int, n_text: int, size: tuple[int, int], *,
                           workers: int = 1, seed: int = 0) -> dict[str, dict]:
  """As `make_sources`, with lengths and image counts drawn around `PUBLISHED`'s means, in
  the shapes-world tokenizer's tokens (words are shapes-world text and captions; the
  record measures the ids a record actually gets)."""
  from mm1_jax.data import shapes_world as sw
  from mm1_jax.data import vocabulary

  rng = np.random.default_rng([seed, 4242])
  vocab = vocabulary.load("shapes_sp")
  text_pool = " ".join(sw.text_example(7, i)["text"] for i in range(400)).split()
  caption_pool = " ".join(sw.caption_example(7, i, 64)["caption"] for i in range(400)).split()
  ratio = {name: len(vocab.encode(" ".join(pool))) / len(pool)
           for name, pool in (("text", text_pool), ("caption", caption_pool))}
  (root / "wds").mkdir(parents=True)
  pixels = _jpegs(list(range(n_caption)), size, workers)
  with tarfile.open(root / "wds" / "shard-000000.tar", "w") as tar:
    for i in range(n_caption):
      _add_pair(tar, i, pixels[i],
                _words(rng, PUBLISHED["caption_tokens"], PUBLISHED["sigma_caption"], caption_pool, ratio["caption"]))
  counts = [1 + int(rng.poisson(PUBLISHED["doc_images"] - 1)) for _ in range(n_docs)]
  (root / "images").mkdir()
  pixels = _jpegs([10_000 + j for j in range(sum(counts))], size, workers)
  with open(root / "docs.jsonl", "w") as f:
    k = 0
    for d, m in enumerate(counts):
      words = _words(rng, PUBLISHED["doc_text_tokens"], PUBLISHED["sigma_doc"], text_pool, ratio["text"]).split()
      texts, images = [], []
      for j in range(m):  # each image followed by its share of the text
        name = f"d{d}_{j}.jpg"
        (root / "images" / name).write_bytes(pixels[k])
        k += 1
        texts += [None, " ".join(words[j * len(words) // m:(j + 1) * len(words) // m]) or "."]
        images += [name, None]
      f.write(json.dumps({"texts": texts, "images": images}) + "\n")
  with open(root / "text.jsonl", "w") as f:
    for _ in range(n_text):
      f.write(json.dumps({"text": _words(rng, PUBLISHED["text_tokens"], PUBLISHED["sigma_text"], text_pool,
                                         ratio["text"])}) + "\n")
  return {"webdataset": {"src": str(root / "wds")},
          "obelics": {"src": str(root / "docs.jsonl"), "image_root": str(root / "images")},
          "text": {"src": str(root / "text.jsonl")}}


# --- running another tree's code ------------------------------------------------------------------

def git_commit(rev: str) -> str:
  """The full commit id of `rev` in this checkout."""
  return subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                        text=True, check=True).stdout.strip()


@contextlib.contextmanager
def worktree(commit: str):
  """A detached `git worktree` of `commit` in a temporary folder, removed (and
  unregistered) on exit."""
  folder = Path(tempfile.gettempdir()) / f"mm1-baseline-{commit[:10]}-{uuid.uuid4().hex[:8]}"
  subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=REPO, check=True,
                 capture_output=True, text=True)
  try:
    yield folder
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=REPO, capture_output=True, check=False)
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True, check=False)


def use_code(code: str | Path, *packages: str) -> dict[str, str]:
  """In a fresh process: imports mm1_jax (and `packages`) from the checkout `code`, and
  fails if any is imported from elsewhere. Returns {package: its file}."""
  code = Path(code).resolve()
  early = [p for p in ("mm1_jax", *packages) if p in sys.modules]
  if early:
    raise RuntimeError(f"{early} already imported: a worker must choose its tree first")
  sys.path.insert(0, str(code))
  import importlib  # noqa: PLC0415

  files = {}
  for name in ("mm1_jax", *packages):
    f = Path(importlib.import_module(name).__file__).resolve()
    if code not in f.parents:
      raise RuntimeError(f"{name} imported from {f}, not from {code}")
    files[name] = str(f)
  return files


def run_worker(script: Path, code: Path, spec: dict, workdir: Path) -> dict:
  """Runs `script --worker=SPEC` in a fresh process with mm1_jax from the checkout `code`
  (also on PYTHONPATH, for the processes it starts); returns the JSON the worker wrote,
  with `process_s`, the process's wall time. Fails with the worker's stderr if it fails."""
  result = workdir / f"result-{uuid.uuid4().hex[:12]}.json"
  spec = {**spec, "code": str(code), "result": str(result)}
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])]))
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, str(script), "--worker=" + json.dumps(spec)], cwd=workdir, env=env,
                        capture_output=True, text=True, check=False)
  process_s = time.perf_counter() - t0
  if proc.returncode or not result.exists():
    raise RuntimeError(f"worker {json.dumps(spec)[:400]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  out = json.loads(result.read_text())
  result.unlink()
  return {**out, "process_s": process_s}


COUNTS = ("written", "images_written", "skipped", "images_dropped", "truncated_documents")


def counts(report: dict) -> dict:
  """What two builds of the same source must agree on (the build report's counts)."""
  return {k: report.get(k) for k in COUNTS}


def check_counts(reports: dict[str, dict], what: str) -> dict:
  """{variant: report} of one source: the counts, which must be equal; else a RuntimeError."""
  seen = {v: counts(r) for v, r in reports.items()}
  first = next(iter(seen.values()))
  if any(c != first for c in seen.values()):
    raise RuntimeError(f"{what}: the builds disagree on what they read:\n"
                       + "\n".join(f"  {v}: {json.dumps(c, sort_keys=True)}" for v, c in seen.items()))
  return first


# --- the measurement -------------------------------------------------------------------------

def build_corpus(srcs: dict[str, dict], out: Path, **kwargs) -> list[dict]:
  """`mm1-data build` of the three sources into `out`: the reports."""
  from mm1_jax.data import build

  return [build.build(fmt, a["src"], out, image_root=a.get("image_root"), progress=False, **kwargs)
          for fmt, a in srcs.items()]


def time_loader(corpus: Path, args) -> dict:
  """Times the grain loader on the built corpus at `args`' shapes: counts and seconds."""
  from mm1_jax.data import loader, pipeline, sources
  from tasks import shapes

  sources.register_corpus("bench", corpus, image_size=args.image_size, output_features=shapes.OUTPUT_FEATURES)
  cfg = pipeline.DataConfig(mixture_or_task_name="bench_pretrain", batch_size=args.batch_size,
                            seq_len=args.seq_len, max_images=args.max_images, module_imports=(),
                            num_threads=args.num_threads)
  t0 = time.perf_counter()
  it = loader.make_loader(cfg, tokens_per_image=args.tokens_per_image, image_size=args.image_size)
  next(it)  # warm-up: thread pool and prefetch buffer
  first_batch_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  seqs = images = tokens = pad = 0
  for _ in range(args.batches):
    b = next(it)
    seqs += b["tokens"].shape[0]
    images += int((b["images"].reshape(b["images"].shape[0], b["images"].shape[1], -1).max(-1) > 0).sum())
    tokens += int((b["segment_ids"] > 0).sum())
    pad += int((b["segment_ids"] == 0).sum())
  return {"seconds": time.perf_counter() - t0, "sequences": seqs, "images": images, "tokens": tokens,
          "padding": pad, "first_batch_s": first_batch_s}


def rates(t: dict, cores: int) -> dict:
  dt, seqs, images, tokens, pad = t["seconds"], t["sequences"], t["images"], t["tokens"], t["padding"]
  return {"sequences_per_s": seqs / dt, "images_per_s": images / dt, "tokens_per_s": tokens / dt,
          "sequences_per_s_per_core": seqs / dt / cores, "images_per_s_per_core": images / dt / cores,
          "images_per_sequence": images / seqs, "padding_fraction": pad / (pad + tokens)}


def worker(spec: dict) -> None:
  """One step of --compare_baseline in this fresh process, with the code of spec["code"]."""
  files = use_code(spec["code"], *(("tasks",) if spec["op"] == "time" else ()))
  if spec["op"] == "build":
    t0 = time.perf_counter()
    out = {"reports": build_corpus(spec["srcs"], Path(spec["out"])), "build_s": time.perf_counter() - t0,
           "folders": sorted(f.name for f in Path(spec["out"]).iterdir() if f.is_dir())}
  else:
    out = time_loader(Path(spec["corpus"]), argparse.Namespace(**spec["args"]))
  Path(spec["result"]).write_text(json.dumps({**out, "imported": files}))


def compare(args, size: tuple[int, int]) -> dict:
  """--compare_baseline: the figures of both trees and their ratios (see the module doc)."""
  commit = git_commit(args.compare_baseline)
  script = Path(__file__).resolve()
  loader_args = {k: getattr(args, k) for k in ("image_size", "seq_len", "max_images", "tokens_per_image",
                                                "batch_size", "num_threads", "batches")}
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp, worktree(commit) as base:
    root = Path(tmp)
    srcs = make_sources(root / "src", args.records, args.records // 4, args.records // 4, size, workers=cores)
    code = {"baseline": base, "current": REPO}
    builds = {}
    for v in ("baseline", "current"):
      print(f"building with the {v} code", file=sys.stderr, flush=True)
      builds[v] = run_worker(script, code[v], {"op": "build", "srcs": srcs, "out": str(root / f"corpus-{v}")}, root)
    build_counts = {r["format"]: check_counts({v: builds[v]["reports"][i] for v in builds}, r["format"])
                    for i, r in enumerate(builds["current"]["reports"])}
    runs = {"baseline": [], "current": []}
    for r in range(args.rounds):
      for v in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
        t = run_worker(script, code[v], {"op": "time", "corpus": str(root / f"corpus-{v}"), "args": loader_args},
                       root)
        runs[v].append(t)
        print(f"round {r} {v}: {t['sequences'] / t['seconds']:.1f} sequences/s", file=sys.stderr, flush=True)
  figures = {"baseline_commit": commit, "rounds": args.rounds}
  for v, ts in runs.items():
    per = [rates(t, cores) for t in ts]
    for k in per[0]:
      figures[f"{v}.{k}"] = statistics.median(p[k] for p in per)
    figures[f"{v}.sequences_per_s_runs"] = [p["sequences_per_s"] for p in per]
    figures[f"{v}.first_batch_s_median"] = statistics.median(t["first_batch_s"] for t in ts)
    figures[f"{v}.build_s"] = builds[v]["build_s"]
    figures[f"{v}.corpus_folders"] = builds[v]["folders"]
    figures[f"{v}.imported"] = ts[0]["imported"]
  for k in ("sequences_per_s", "images_per_s", "tokens_per_s"):
    figures[f"ratio.{k}"] = figures[f"current.{k}"] / figures[f"baseline.{k}"]
  figures["build_counts"] = build_counts
  figures["layouts"] = {"baseline": "<dir>/<kind>/<split>-<tag>-*.array_record (its build)",
                        "current": "TFDS datasets <dir>/mm1_<kind>/1.0.0/ in ArrayRecord form (its build)"}
  figures["left_out"] = ("source generation and the corpus builds (build_s: one build per tree, not "
                         "alternated); each timing's process start, imports, task registration and first "
                         "(warm-up) batch, which first_batch_s_median gives. The two corpora hold the same "
                         "records in a different shard order, so the batches differ: padding_fraction and "
                         "images_per_sequence are given for each tree")
  return figures


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=378)
  p.add_argument("--source_size", default="500x375", help="JPEG size in the shards, WxH")
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--max_images", type=int, default=16)
  p.add_argument("--tokens_per_image", type=int, default=144)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--num_threads", type=int, default=2)
  p.add_argument("--batches", type=int, default=10, help="timed batches (of each timing with --compare_baseline)")
  p.add_argument("--records", type=int, default=400, help="caption pairs (documents: a quarter of it)")
  p.add_argument("--compare_baseline", default=None, metavar="COMMIT",
                 help="time COMMIT's build and loader beside this checkout's, alternating (module doc)")
  p.add_argument("--rounds", type=int, default=3, help="with --compare_baseline: timings of each tree")
  p.add_argument("--json_out", default=None, help="write the run's record (benchmarks/record.py) here")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one step of --compare_baseline (JSON)
  args = p.parse_args(argv)
  if args.worker:
    worker(json.loads(args.worker))
    return {}
  from benchmarks import record as record_lib

  git = record_lib.git_state()
  size = tuple(int(x) for x in args.source_size.split("x"))
  if args.compare_baseline:
    figures = compare(args, size)
    summary = {k: v for k, v in figures.items() if not isinstance(v, (dict, list))}
    print(json.dumps(summary, indent=1))
    if args.json_out:
      record_lib.write(Path(args.json_out).resolve(), "loader_compare", figures, git=git,
                       baseline={"commit": figures["baseline_commit"],
                                 "code": "a git worktree of the commit: its mm1_jax and tasks"})
    return figures

  from mm1_jax.data import build, loader, pipeline, sources  # noqa: F401  (loaded before build_s starts)
  from tasks import shapes  # noqa: F401

  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    t0 = time.perf_counter()
    srcs = make_sources(root / "src", args.records, args.records // 4, args.records // 4, size)
    out = root / "corpus"
    reports = build_corpus(srcs, out)
    build_s = time.perf_counter() - t0
    t = time_loader(out, args)
  cores = os.cpu_count() or 1
  record = {
      "machine": f"{platform.machine()}, {cores} cores", "python": platform.python_version(),
      "image_size": args.image_size, "source_jpeg": args.source_size, "seq_len": args.seq_len,
      "max_images": args.max_images, "tokens_per_image": args.tokens_per_image,
      "batch_size": args.batch_size, "num_threads": args.num_threads, "timed_batches": args.batches,
      **rates(t, cores), "build_s": build_s, "build_reports": reports,
  }
  print(json.dumps({k: v for k, v in record.items() if k != "build_reports"}, indent=1))
  if args.json_out:
    record_lib.write(Path(args.json_out).resolve(), "loader", record, git=git)
  return record


if __name__ == "__main__":
  main()
