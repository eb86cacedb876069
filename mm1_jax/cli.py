"""`mm1-train` and `mm1-eval`: pre-training and few-shot evaluation, gin-configured.

Gin flags as every command takes them (`mm1_jax.gin_cli`): --gin_file, --gin.NAME=VALUE,
--gin_search_paths, --module_import. Started through `mm1_jax.console`, which settles the
JAX platform first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gin
import jax

from mm1_jax import distributed, gin_checks, gin_cli, paths
from mm1_jax import train as train_lib
from mm1_jax.eval import run as run_lib


def _parser(prog: str, description: str, workdir_required: bool = True) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=description)
  gin_cli.add_gin_flags(p)
  p.add_argument("--workdir", required=workdir_required, help="run directory")
  g = p.add_argument_group("multi-process (not needed on Cloud TPU VMs, found automatically there)")
  g.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 (or $MM1_COORDINATOR_ADDRESS)")
  g.add_argument("--num_processes", type=int, default=None, help="processes in all (or $MM1_NUM_PROCESSES)")
  g.add_argument("--process_id", type=int, default=None, help="this process, 0-based (or $MM1_PROCESS_ID)")
  return p


def _start_runtime(args: argparse.Namespace) -> None:
  # Random numbers that do not depend on how arrays are sharded, so a run initialises
  # the same parameters on any mesh.
  jax.config.update("jax_threefry_partitionable", True)
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def main_train(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  parser = _parser("mm1-train", "Pre-train MM1: image encoder + connector + decoder, gin-configured. "
                   "Resumes from the newest checkpoint in --workdir.")
  parser.add_argument("--stop_after_steps", type=int, default=0,
                      help="end after this many steps with a checkpoint and exit code 0 (time-sliced "
                           "jobs: the same command continues)")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="continue the run in --workdir although its recorded config.gin differs "
                           "(the old one is kept as config.gin.<time>)")
  args = parser.parse_args(rest)
  _start_runtime(args)
  gin_cli.parse(args, bindings)
  workdir = paths.path(args.workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    parser.error(f"cannot use --workdir={args.workdir}: {e.strerror}")
  config = gin.config_str()
  first = jax.process_index() == 0  # the one process that writes the run's own files
  try:
    gin_checks.check_workdir_config(workdir, config, allow_change=args.allow_config_change, archive=first)
  except gin_checks.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if first:
    paths.write_text_atomic(workdir / "config.gin", config)
  kwargs = {"stop_after_steps": args.stop_after_steps} if args.stop_after_steps else {}
  code = gin.get_configurable(train_lib.train)(workdir=str(workdir), **kwargs)
  if first:
    paths.write_text_atomic(workdir / "operative_config.gin", gin.operative_config_str())
  return code


def main_eval(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  parser = _parser("mm1-eval", "Few-shot evaluation of MM1 checkpoints; writes "
                   "<workdir>/eval/step_<N>.json and prints a table. With --watch, evaluates "
                   "every checkpoint not yet evaluated, writes TensorBoard scalars and "
                   "eval/report.md with plots, and exits 3 when a score regressed.",
                   workdir_required=False)
  parser.add_argument("--checkpoint_dir", default=None,
                      help="orbax checkpoint folder (default: <workdir>/checkpoints); --workdir "
                           "defaults to its parent")
  parser.add_argument("--no_run_config", action="store_true",
                      help="do not read the run's own <workdir>/config.gin before --gin_file")
  parser.add_argument("--steps", default="latest",
                      help="'latest', 'all', or comma-separated steps to evaluate")
  parser.add_argument("--force", action="store_true", help="re-evaluate steps that have results")
  parser.add_argument("--benchmarks", default=None,
                      help="comma-separated benchmarks, e.g. coco,vqav2 (known: coco, nocaps, "
                           "textcaps, vqav2, textvqa, vizwiz, okvqa, gqa, shapes_caption, shapes_vqa, "
                           "shapes_text_ppl, shapes_textqa)")
  parser.add_argument("--shots", default=None, help="comma-separated shot counts, e.g. 0,4,8")
  parser.add_argument("--num_queries", type=int, default=None,
                      help="scored examples per benchmark (0: the whole test split)")
  parser.add_argument("--data_root", default=None,
                      help="folder with one sub-folder per benchmark in its shipped layout "
                           "(default $MM1_EVAL_DATA or ~/data/mm1_eval)")
  parser.add_argument("--watch", action="store_true",
                      help="nightly mode: every checkpoint not yet evaluated, report, regression check")
  parser.add_argument("--poll_seconds", type=float, default=0.0,
                      help="with --watch, look for new checkpoints this often (0: one pass)")
  parser.add_argument("--idle_timeout", type=float, default=3600.0,
                      help="with --poll_seconds, stop after this long without a new checkpoint")
  parser.add_argument("--max_regression", type=float, default=0.05,
                      help="with --watch, relative drop below the best earlier score that fails "
                           "(for NLL and perplexity: rise above it)")
  args = parser.parse_args(rest)
  if args.workdir is None:
    if args.checkpoint_dir is None:
      parser.error("give --workdir, or --checkpoint_dir (the workdir is then its parent)")
    args.workdir = str(paths.path(args.checkpoint_dir).parent)
  ckpt_dir = paths.path(args.checkpoint_dir or paths.path(args.workdir) / "checkpoints")
  if not ckpt_dir.is_dir():
    parser.error(f"no checkpoint folder at {ckpt_dir}")
  run_config = paths.path(args.workdir) / "config.gin"
  if run_config.exists() and not args.no_run_config:  # the run's model; later files override
    args.gin_file = [paths.local_file(run_config, suffix=".gin"), *args.gin_file]
  cfg = "fewshot.FewShotConfig"
  if args.benchmarks:
    names = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
    bindings.append(f"{cfg}.benchmarks = {names!r}")
  if args.shots:
    bindings.append(f"{cfg}.shots = {tuple(int(k) for k in args.shots.split(','))!r}")
  if args.num_queries is not None:
    bindings.append(f"{cfg}.num_queries = {args.num_queries or None!r}")
  if args.data_root:
    bindings.append(f"{cfg}.data_root = {str(Path(args.data_root).expanduser())!r}")
  _start_runtime(args)
  hint = "" if run_config.exists() else (f"{run_config} does not exist: give the model's gin file too, "
                                         "e.g. --gin_file=gin/models/mm1_tiny.gin")
  gin_cli.parse(args, bindings, hint=hint)
  return gin.get_configurable(run_lib.evaluate)(
      workdir=args.workdir, checkpoint_dir=str(ckpt_dir), steps=args.steps, force=args.force,
      watch=args.watch, poll_seconds=args.poll_seconds, idle_timeout=args.idle_timeout,
      max_regression=args.max_regression)


if __name__ == "__main__":  # python -m mm1_jax.cli {train,eval} ...
  from mm1_jax import console

  if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval"):
    raise SystemExit("usage: python -m mm1_jax.cli {train,eval} [flags]")
  sys.exit(console.run(sys.argv[1], sys.argv[2:]))
