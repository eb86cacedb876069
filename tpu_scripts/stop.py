#!/usr/bin/env python3
"""Stop a run on every worker: SIGTERM, so mm1-train saves a checkpoint and exits 143.

A worker still running after --grace_s is killed. The same launch command resumes the
run later from that checkpoint. The capacity stays; delete.py removes it.

  python tpu_scripts/stop.py @pod.flags --run_name=7b-a [--bucket=gs://my-bucket/mm1] [--grace_s=600] [--dry_run]

With the run's --bucket (or a --workdir this machine can read) it then prints the run's
newest metrics and goodput from the run folder. Each worker uploads its log to a bucket
workdir as its run ends.
"""

import _pod


def build_parser():
  p = _pod.parser("stop.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--run_name", required=True)
  p.add_argument("--grace_s", type=float, default=600, help="seconds to wait for the checkpoint")
  _pod.add_run_folder_flags(p)
  return p


def run(args, _gin_flags):
  pod = _pod.pod_from_args(args)
  _pod.check_run_folder_args(args)
  runner = _pod.Runner(args.dry_run)
  statuses = _pod.stop_run(pod, args.run_name, args.grace_s, runner)
  if not args.dry_run:
    s = _pod.summarize(pod, statuses)
    print(f"stopped {args.run_name}: {s['by_state']} exit codes {s['exit_codes']}")
    workdir = _pod.run_folder(args, statuses)
    if workdir:
      folder = _pod.read_run_folder(workdir)
      if folder["metrics"]:
        print(f"{workdir}: {_pod.metrics_line(folder['metrics'])}")
      line = _pod.goodput_line(statuses, folder["goodput"])
      if line:
        print(line)
    if s["running"]:
      return _pod.FAILED
  return 0


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser()))
