#!/usr/bin/env python3
"""Stop a run on every worker: SIGTERM, so mm1-train saves a checkpoint and exits 143.

A worker still running after --grace_s is killed. The same launch command resumes the
run later from that checkpoint. The capacity stays; delete.py removes it.

  python tpu_scripts/stop.py @pod.flags --run_name=7b-a [--grace_s=600] [--dry_run]
"""

import _pod


def build_parser():
  p = _pod.parser("stop.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--run_name", required=True)
  p.add_argument("--grace_s", type=float, default=600, help="seconds to wait for the checkpoint")
  return p


def run(args, _gin_flags):
  pod = _pod.pod_from_args(args)
  runner = _pod.Runner(args.dry_run)
  statuses = _pod.stop_run(pod, args.run_name, args.grace_s, runner)
  if not args.dry_run:
    s = _pod.summarize(pod, statuses)
    print(f"stopped {args.run_name}: {s['by_state']} exit codes {s['exit_codes']}")
    if s["running"]:
      return _pod.FAILED
  return 0


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser()))
