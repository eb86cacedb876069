"""The benchmark suite: measures, writes one record per benchmark, then renders RESULTS.md.

  python -m benchmarks.run                       # everything, full sizes (the preflight compiles
                                                 # every pod preset: about two hours on 2 cores)
  python -m benchmarks.run --skip preflight      # the rest (about 20 min on 2 cores)
  python -m benchmarks.run --only train_small    # one benchmark (repeatable)
  python -m benchmarks.run --render              # RESULTS.md from the records, nothing measured
  python -m benchmarks.run --short --results_dir /tmp/b   # tiny sizes: only that it runs

Each benchmark run writes results/suite/<benchmark>.json (benchmarks/record.py: commit, date,
command, machine, packages, figures); the preflight also writes results/preflight/<preset>.json.
RESULTS.md is generated from the records alone and names the record and commit of every figure.

Benchmarks:
  peak          float32 jnp.dot rate of this machine (the "measured matmul rate"), beside the
                CPU peak derived from its instruction set (mm1_jax.hardware: the MFU denominator)
  train_small   train steps of gin/models/bench_small.gin (MLP projector, 256 image tokens)
  train_small_cabs   the same with a C-Abstractor of 64 tokens
  moe_vs_dense  every 2nd decoder FFN -> 8 experts (top-2, each the dense FFN's size) at the
                shipped capacity factor (MoEConfig default); step-time ratio to a dense model
                with the same active parameters, per dispatch, with the token drop rate
  decode        batched greedy decoding with the KV cache
  peer          the same model in PyTorch + transformers (LLaVA), train steps and generate()
  loader        the grain loader (benchmarks/loader.py)
  preflight     mm1-aot for every gin/pods/*.gin (benchmarks/preflight.py); --short compiles the
                quickstart for v5p-8 without costing; --skip preflight records that it was skipped
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

NAMES = ("peak", "train_small", "train_small_cabs", "moe_vs_dense", "decode", "peer", "loader", "preflight")

# The fixed shapes (benchmarks/README.md); --short shrinks everything to check the code runs.
FULL = dict(batch=8, seq_len=512, steps=5, warmup=2, matmul=(2048, 4096), decode_batch=8, prompt_text=256,
            new_tokens=64)
SHORT = dict(batch=2, seq_len=16, steps=2, warmup=1, matmul=(256,), decode_batch=2, prompt_text=8, new_tokens=4)
SHORT_MODEL = ["vit.ViTConfig.image_size = 28", "vit.ViTConfig.width = 32", "vit.ViTConfig.depth = 1",
               "vit.ViTConfig.num_heads = 2", "vit.ViTConfig.mlp_dim = 64", "decoder.DecoderConfig.width = 32",
               "decoder.DecoderConfig.depth = 2", "decoder.DecoderConfig.num_heads = 2",
               "decoder.DecoderConfig.num_kv_heads = 2", "decoder.DecoderConfig.head_dim = 16",
               "decoder.DecoderConfig.mlp_dim = 64", "decoder.DecoderConfig.vocab_size = 512"]


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_small(short: bool, c_abstractor: bool = False):
  """The bench_small MM1Config (or its tiny stand-in with --short)."""
  import gin

  from mm1_jax import connector

  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(REPO))
  gin.parse_config_files_and_bindings(["gin/models/bench_small.gin"], SHORT_MODEL if short else [])
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  gin.clear_config(clear_constants=True)
  if c_abstractor:
    cab = connector.CAbstractorConfig(num_tokens=4 if short else 64, dtype=config.decoder.dtype)
    config = dataclasses.replace(config, connector=cab)
  return config


# --- the benchmarks ------------------------------------------------------------------------

def run_peak(s: dict, short: bool, results: dict) -> dict:
  import jax
  import jax.numpy as jnp

  best = {}
  for n in s["matmul"]:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(3 if n >= 4096 else 10):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    best[f"matmul_flops_per_s_n{n}"] = 2 * n**3 / statistics.median(times)
  from mm1_jax import hardware

  isa = hardware.cpu_peak() if jax.default_backend() == "cpu" else hardware.device_peak()
  measured = max(best.values())
  return {**best, "matmul_flops_per_s": measured, "peak_flops_per_s": isa.flops_per_s,
          "peak_derivation": isa.derivation, "matmul_fraction_of_peak": measured / isa.flops_per_s}


def _matmul_rate(results: dict) -> float:
  if "peak" not in results:
    raise SystemExit("the measured matmul rate is needed: run with --only peak too (or without --only)")
  return results["peak"]["matmul_flops_per_s"]


def _train(config, s: dict, short: bool, results: dict) -> dict:
  from benchmarks import train_step

  r = train_step.measure(config, s["batch"], s["seq_len"], 1, steps=s["steps"], warmup=s["warmup"],
                         progress=not short)
  keep = ("params", "compile_s", "step_s_median", "step_s_min", "tokens_per_s", "images_per_s",
          "model_flops_per_step", "flops_per_s", "peak_flops_per_device", "peak_source", "mfu", "final_loss")
  return {k: r[k] for k in keep} | {"image_tokens": config.tokens_per_image,
                                    "fraction_of_measured_matmul": r["flops_per_s"] / _matmul_rate(results)}


def run_train_small(s, short, results):
  """Also times the same step with the LM head only at the text positions
  (`train.train.logit_positions`: the sequence less the image's tokens), beside the full head
  whose FLOPs the MFU counts."""
  from benchmarks import train_step

  config = bench_small(short)
  out = _train(config, s, short, results)
  text = s["seq_len"] - config.tokens_per_image
  r = train_step.measure(config, s["batch"], s["seq_len"], 1, steps=s["steps"], warmup=s["warmup"],
                         progress=not short, logit_positions=text)
  return out | {"logit_positions": text, "step_s_median_head_at_targets": r["step_s_median"],
                "final_loss_head_at_targets": r["final_loss"]}


def run_train_small_cabs(s, short, results):
  return _train(bench_small(short, c_abstractor=True), s, short, results)


def run_moe_vs_dense(s: dict, short: bool, results: dict) -> dict:
  from benchmarks import train_step
  from mm1_jax import moe

  base = bench_small(short)
  d = base.decoder
  # Top-2 of experts the dense FFN's size in every 2nd layer = 1.5x the dense FFN on average.
  dense = dataclasses.replace(base, decoder=dataclasses.replace(d, mlp_dim=d.mlp_dim * 3 // 2))
  out = {}
  shipped = moe.MoEConfig().capacity_factor  # what every preset ships (gin/models/*moe*.gin)
  out["capacity_factor"] = shipped
  runs = [("dense_equal_active", dense)] + [
      (mode, dataclasses.replace(base, decoder=dataclasses.replace(d, moe=moe.MoEConfig(
          num_experts=8, top_k=2, every=2, dispatch=mode, capacity_factor=shipped))))
      for mode in moe.DISPATCH_MODES]
  for name, config in runs:
    log(f"moe_vs_dense: {name}")
    r = train_step.measure(config, s["batch"], s["seq_len"], 1, steps=s["steps"], warmup=s["warmup"],
                           progress=not short)
    out[f"{name}_step_s"] = r["step_s_median"]
    out[f"{name}_params"] = r["params"]
    if "moe_drop_rate" in r:  # of the last timed step, on random tokens (an untrained router)
      out[f"{name}_drop_rate"] = r["moe_drop_rate"]
  for mode in moe.DISPATCH_MODES:
    out[f"ratio_{mode}"] = out[f"{mode}_step_s"] / out["dense_equal_active_step_s"]
  out["ratio"] = min(out[f"ratio_{m}"] for m in moe.DISPATCH_MODES)
  return out


def run_decode(s: dict, short: bool, results: dict) -> dict:
  import functools

  import flax.linen as nn
  import jax
  import numpy as np

  from mm1_jax import decoder, train
  from mm1_jax.data.ids import SpecialIds
  from mm1_jax.eval.fewshot import _generate
  from mm1_jax.model import MM1

  config = bench_small(short)
  model = MM1(config)
  b, q = s["decode_batch"], config.tokens_per_image
  p = q + s["prompt_text"]
  example = train.dummy_batch(1, 8, 1, config)
  params = nn.meta.unbox(jax.jit(lambda r: model.init(
      r, example["tokens"], example["images"], example["segment_ids"], example["positions"])["params"])(
          jax.random.PRNGKey(0)))
  rng = np.random.default_rng(1)
  tokens = rng.integers(5, config.decoder.vocab_size, (b, p)).astype(np.int32)
  tokens[:, 1:1 + q] = config.image_token_id  # one image after the first token, as the peer's prompt
  valid = np.ones((b, p), bool)
  images = rng.integers(0, 256, (b, 1, config.encoder.image_size, config.encoder.image_size, 3), np.uint8)
  # A vocabulary of the model's size with the shapes-world special ids; decoding runs all
  # new_tokens steps whatever is generated, so which ids stop an answer does not change the time.
  ids = SpecialIds(image=config.image_token_id, eos=1, pad=0, stops=(1,), banned=(0, config.image_token_id),
                   size=config.decoder.vocab_size)
  gen = jax.jit(functools.partial(_generate, model=model, max_new=s["new_tokens"], ids=ids))
  t0 = time.perf_counter()
  gen(params, tokens, valid, images).block_until_ready()
  compile_s = time.perf_counter() - t0
  # The prompt's prefill alone (images encoded, the cache filled, the first logits), to split
  # the time between the prompt and the new tokens.
  prefill = jax.jit(lambda params, tokens, valid, images: model.apply(
      {"params": params}, tokens, images, valid, decoder.init_cache(config.decoder, b, p + s["new_tokens"]),
      method=MM1.prefill)[0])
  prefill(params, tokens, valid, images).block_until_ready()
  times, prefill_times = [], []
  for _ in range(1 if short else 3):
    t = time.perf_counter()
    out = gen(params, tokens, valid, images).block_until_ready()
    times.append(time.perf_counter() - t)
    t = time.perf_counter()
    prefill(params, tokens, valid, images).block_until_ready()
    prefill_times.append(time.perf_counter() - t)
  median = statistics.median(times)
  return {"tokens_per_s": b * out.shape[1] / median, "seconds_median": median,
          "prefill_s_median": statistics.median(prefill_times), "compile_s": compile_s,
          "batch": b, "prompt_positions": p, "new_tokens": int(out.shape[1])}


def run_peer(s: dict, short: bool, results: dict) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "peer.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "peer_llava.py"), f"--json_out={out}"]
    proc = subprocess.run(cmd + (["--short"] if short else []), capture_output=True, text=True)
    if proc.returncode or not out.exists():
      raise RuntimeError(f"peer_llava.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    r = json.loads(out.read_text())
  return {"train_tokens_per_s": r["train"]["tokens_per_s"], "train_step_s": r["train"]["step_s_median"],
          "decode_tokens_per_s": r["decode"]["tokens_per_s"], "decode_s": r["decode"]["seconds_median"],
          "decode_prefill_s": r["decode"]["prefill_s_median"], "params": r["params"], "threads": r["threads"],
          "torch": r["torch"], "transformers": r["transformers"], "attention": r["attention"]}


def run_loader(s: dict, short: bool, results: dict) -> dict:
  from benchmarks import loader

  argv = ["--records=16", "--batches=2", "--seq_len=256", "--max_images=2", "--image_size=64",
          "--tokens_per_image=16"] if short else []
  r = loader.main(argv)
  return {k: r[k] for k in ("sequences_per_s", "images_per_s", "tokens_per_s", "padding_fraction")}


def run_preflight(s: dict, short: bool, results: dict) -> dict:
  """Compiles every pod preset for its topology (benchmarks/preflight.py writes each record);
  --short compiles the quickstart for v5p-8, memory only."""
  from benchmarks import preflight

  if short:
    with tempfile.TemporaryDirectory() as tmp:
      r = preflight.aot_report("gin/experiments/quickstart.gin", ["--topology=v5p-8", "--no_cost"], Path(tmp))
    return {"quickstart_v5p-8.per_chip_gib": r["per_chip_bytes"] / 2**30, "quickstart_v5p-8.fits": r["fits"]}
  out = {}
  for preset in sorted((REPO / "gin" / "pods").glob("*.gin")):
    log(f"preflight: {preset.stem}")
    r = preflight.run(preset)["figures"]
    out[f"{preset.stem}.projected_mfu"] = r.get("projected_mfu")
    out[f"{preset.stem}.per_chip_gib"] = r["per_chip_bytes"] / 2**30 if r.get("per_chip_bytes") else None
  return out


def _side_by_side(measured: dict, names: list[str], suite_dir: Path, git: dict, short: bool) -> None:
  """Adds to the peer's record its ratios to the benchmarks measured in the same run (a ratio
  survives a noisy machine only when both sides ran together): train step time, whole
  greedy generate, and the generate less its prefill (the decode loop alone)."""
  from benchmarks import record

  peer, ratios = measured["peer"], {}
  if "train_small" in names:
    ours = measured["train_small"]
    ratios["train_speedup_vs_peer"] = peer["train_step_s"] / ours["step_s_median"]
    if "step_s_median_head_at_targets" in ours:
      ratios["train_speedup_vs_peer_head_at_targets"] = peer["train_step_s"] / ours["step_s_median_head_at_targets"]
  if "decode" in names:
    ours = measured["decode"]
    ratios["decode_speedup_vs_peer"] = ours["tokens_per_s"] / peer["decode_tokens_per_s"]
    ratios["prefill_speedup_vs_peer"] = peer["decode_prefill_s"] / ours["prefill_s_median"]
    ratios["decode_loop_s"] = ours["seconds_median"] - ours["prefill_s_median"]
    ratios["peer_decode_loop_s"] = peer["decode_s"] - peer["decode_prefill_s"]
    ratios["decode_loop_speedup_vs_peer"] = ratios["peer_decode_loop_s"] / ratios["decode_loop_s"]
  if ratios:
    path = suite_dir / "peer.json"
    wall_s = json.loads(path.read_text()).get("wall_s")
    peer.update(ratios)
    record.write(path, "peer", peer, git=git, short=short, wall_s=wall_s)


RUNNERS = {"peak": run_peak, "train_small": run_train_small, "train_small_cabs": run_train_small_cabs,
           "moe_vs_dense": run_moe_vs_dense, "decode": run_decode, "peer": run_peer, "loader": run_loader,
           "preflight": run_preflight}


# --- the report ------------------------------------------------------------------------------

def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
  """(target, measured, required, met) rows, from {benchmark: figures}."""
  rows = []

  def get(bench, fig):
    return r.get(bench, {}).get(fig)

  mfu = get("train_small", "mfu")
  frac = get("train_small", "fraction_of_measured_matmul")
  rows.append(("train_small MFU (useful FLOPs / ISA-derived CPU peak)",
               f"{mfu:.1%} ({frac:.1%} of the measured matmul rate)" if mfu and frac else "-", ">= 50 %",
               None if mfu is None else mfu >= 0.5))
  ours, peer = get("train_small", "tokens_per_s"), get("peer", "train_tokens_per_s")
  ratio = ours / peer if ours and peer else None
  rows.append(("train_small tokens/s vs PyTorch + transformers LLaVA", f"{ratio:.2f}x" if ratio else "-",
               ">= 1.2x", None if ratio is None else ratio >= 1.2))
  ratio = get("peer", "train_speedup_vs_peer_head_at_targets")
  rows.append(("the same, LM head at text positions only (`logit_positions`; same run)",
               f"{ratio:.2f}x" if ratio else "-", ">= 1.2x", None if ratio is None else ratio >= 1.2))
  moe_ratio = get("moe_vs_dense", "ratio")
  cf = get("moe_vs_dense", "capacity_factor")
  drops = get("moe_vs_dense", "capacity_drop_rate")
  rows.append((f"MoE / dense step time (better dispatch; capacity factor {cf})",
               (f"{moe_ratio:.2f}" + (f" (capacity dispatch dropped {drops:.1%})" if drops is not None else ""))
               if moe_ratio else "-", "<= 1.3", None if moe_ratio is None else moe_ratio <= 1.3))
  ours, peer = get("decode", "tokens_per_s"), get("peer", "decode_tokens_per_s")
  ratio = ours / peer if ours and peer else None
  rows.append(("decode tokens/s vs transformers generate()", f"{ratio:.2f}x" if ratio else "-", ">= 2x",
               None if ratio is None else ratio >= 2.0))
  return rows


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


def _machine_line(m: dict, packages: dict) -> str:
  acc = m.get("accelerator") or "no accelerator"
  return (f"{m['cpu']} ({', '.join(m.get('isa', []))}), {m['cores']} cores, {m['memory_gib']} GiB, {acc}; "
          + ", ".join(f"{k} {v}" for k, v in packages.items() if k in ("python", "jax", "flax", "torch")))


def render(results_dir: Path, md: Path) -> str:
  """RESULTS.md from the records under results_dir (suite/, preflight/ and single runs)."""
  from benchmarks import preflight as preflight_lib
  from benchmarks import record

  suite = {}
  for f in sorted((results_dir / "suite").glob("*.json")):
    suite[f.stem] = (f, json.loads(f.read_text()))
  figures = {name: rec["figures"] for name, (_, rec) in suite.items()}
  short = any(rec.get("short") for _, rec in suite.values())
  lines = ["# Benchmark results", "",
           "Generated from the records under `benchmarks/results/` by `python -m benchmarks.run` "
           "(`--render` re-renders without measuring)" + (" --short: tiny sizes, not figures to quote" if short
                                                         else "") + ". Each figure names its record; the "
           "record names the commit, date, command, machine and package versions of its run.", "",
           "## Targets", "", "| target | measured | required | met |", "|---|---|---|---|"]
  for name, measured, required, met in targets(figures):
    lines.append(f"| {name} | {measured} | {required} | {'-' if met is None else ('yes' if met else 'no')} |")
  lines += ["", "## Suite", ""]
  for bench in NAMES:
    if bench not in suite:
      continue
    f, rec = suite[bench]
    lines += [f"### {bench}", "",
              f"Record `results/suite/{f.name}`, "
              f"commit {record.short_commit(rec)}, {rec['date']}; {_machine_line(rec['machine'], rec['packages'])}.",
              "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rec["figures"].items()]
    lines.append("")
  pre = results_dir / "preflight"
  if any(pre.glob("*.json")):
    lines += ["## TPU preflight (mm1-aot)", "",
              "Compiled by libtpu for the stated topology on a CPU machine; roofline times leave out "
              "inter-chip communication, so MFU figures are upper bounds. Records: `results/preflight/`.", "",
              preflight_lib.table(pre), ""]
  others = [(p, r) for p, r in record.all_records(results_dir).items() if not p.startswith(("suite/", "preflight/"))]
  if others:
    lines += ["## Other records", "", "| record | benchmark | commit | date | machine |", "|---|---|---|---|---|"]
    for path, rec in others:
      if rec.get("schema"):
        lines.append(f"| `results/{path}` | {rec['benchmark']} | {record.short_commit(rec)} | {rec['date']} | "
                     f"{rec['machine']['cpu']}, {rec['machine']['cores']} cores"
                     f"{', ' + rec['machine']['accelerator'] if rec['machine'].get('accelerator') else ''} |")
      else:
        lines.append(f"| `results/{path}` | - | legacy record: no commit or machine recorded | - | - |")
    lines.append("")
  notes = REPO / "benchmarks" / "RESULTS_NOTES.md"
  if notes.exists() and not short:
    lines += [notes.read_text().strip(), ""]
  text = "\n".join(lines)
  md.write_text(text)
  return text


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", action="append", choices=NAMES, default=None, help="benchmark to run (repeatable)")
  p.add_argument("--skip", action="append", choices=NAMES, default=[],
                 help="benchmark not to run (repeatable); its record then says it was skipped")
  p.add_argument("--short", action="store_true", help="tiny sizes: checks that every benchmark runs")
  p.add_argument("--render", action="store_true", help="only render RESULTS.md from the records")
  p.add_argument("--json_out", default=None, help='also write {"<benchmark>": {"<figure>": value}} here')
  p.add_argument("--results_dir", default=None,
                 help="where the records (suite/, preflight/) and RESULTS.md go (default: benchmarks/results "
                      "and benchmarks/RESULTS.md; --short defaults to a temporary folder)")
  args = p.parse_args(argv)
  from benchmarks import record
  from mm1_jax import console

  if args.results_dir:
    results_dir = Path(args.results_dir)
    md = results_dir / "RESULTS.md"
  elif args.short:
    results_dir = Path(tempfile.mkdtemp(prefix="mm1_bench_"))
    md = results_dir / "RESULTS.md"
  else:
    results_dir, md = REPO / "benchmarks" / "results", REPO / "benchmarks" / "RESULTS.md"
  if args.render:
    render(results_dir, md)
    print(f"wrote {md}")
    return {}
  console.prepare_platform("train")  # CPU-only hosts with libtpu installed: say so before jax starts
  git = record.git_state()
  suite_dir = results_dir / "suite"
  previous = {f.stem: json.loads(f.read_text())["figures"] for f in suite_dir.glob("*.json")}
  names = [n for n in (args.only or NAMES) if n not in args.skip]
  if any(n.startswith("train_small") for n in names) and "peak" not in names and "peak" not in previous:
    names = ["peak", *names]
  s = SHORT if args.short else FULL
  measured = dict(previous)
  for name in NAMES:
    if name in args.skip and not args.only:
      record.write(suite_dir / f"{name}.json", name, {"skipped": "--skip " + name}, git=git, short=args.short)
      continue
    if name not in names:
      continue
    log(f"{name} ...")
    t0 = time.perf_counter()
    measured[name] = RUNNERS[name](s, args.short, measured)
    record.write(suite_dir / f"{name}.json", name, measured[name], git=git, short=args.short,
                 wall_s=round(time.perf_counter() - t0, 1))
    log(f"{name}: {time.perf_counter() - t0:.0f} s {json.dumps(measured[name])[:300]}")
  if "peer" in names:
    _side_by_side(measured, names, suite_dir, git, args.short)
  render(results_dir, md)
  if args.json_out:
    Path(args.json_out).write_text(json.dumps({n: measured[n] for n in names}, indent=1) + "\n")
  print(f"wrote {md} and the records under {suite_dir}")
  return measured


if __name__ == "__main__":
  main()
