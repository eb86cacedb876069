#!/usr/bin/env python3
"""Launch a training run on every worker at once: same gin files, overrides and run name.

Each worker starts `mm1-train` detached (tpu_scripts/worker.py), with the multi-host
environment set (MM1_DISTRIBUTED=tpu: jax.distributed reads the coordinator, process
ids and, on several slices, the MEGASCALE_* slice settings from the TPU metadata). The
preflight gate runs first. Launching into a workdir that holds checkpoints resumes from
the newest.

With --bucket=gs://BUCKET/PREFIX the workdir is gs://BUCKET/PREFIX/runs/RUN_NAME, which
mm1-train writes directly; each worker's log stays on its disk
(~/mm1_runs/RUN_NAME/logs/slice<S>-worker<W>.log) and is uploaded to the workdir's logs/
every --log_upload_s and when it ends. Without it the workdir is --shared_dir/runs/RUN_NAME
on the folder setup_workers.py mounted, and the logs are in its logs/.

  python tpu_scripts/launch.py @pod.flags --bucket=gs://my-bucket/mm1 --run_name=7b-a \\
      --gin_file=gin/pods/mm1_7b_v5p-256.gin --gin.TRAIN_STEPS=100000 \\
      --gin.DATA_DIR="'gs://my-bucket/data'" [--dry_run]
"""

import _pod


def build_parser():
  p = _pod.parser("launch.py", __doc__)
  _pod.add_pod_flags(p)
  _pod.add_run_flags(p)
  return p


def run(args, gin_flags):
  pod = _pod.pod_from_args(args)
  runner = _pod.Runner(args.dry_run)
  sha, gin_flags = _pod.prepare_run(pod, args, gin_flags, runner)
  _pod.launch(pod, sha, args, gin_flags, runner)
  if not args.dry_run:
    print(f"launched {args.run_name} ({sha[:12]}) on {pod.describe()}; workdir {args.workdir}")
    where = ""
    if _pod.is_remote(args.workdir):
      where = (f" --bucket={args.bucket}" if args.bucket and args.workdir == f"{args.bucket}/runs/{args.run_name}"
               else f" --workdir={args.workdir}")
    print(f"watch it:  python tpu_scripts/watch.py <pod flags>{where} --run_name={args.run_name} --follow")
  return 0


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser(), gin=True))
