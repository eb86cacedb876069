#!/usr/bin/env python3
"""Delete the TPU capacity (queued resource with its slices, or the TPU VM).

With --run_name the run is stopped first (checkpoint on SIGTERM), so nothing is lost.
Deleting asks for --yes.

  python tpu_scripts/delete.py @pod.flags [--run_name=7b-a] --yes [--dry_run]
"""

import _pod


def build_parser():
  p = _pod.parser("delete.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--run_name", default=None, help="stop this run first (checkpoint) before deleting")
  p.add_argument("--grace_s", type=float, default=600)
  p.add_argument("--yes", action="store_true", help="delete without asking")
  return p


def run(args, _gin_flags):
  pod = _pod.pod_from_args(args)
  runner = _pod.Runner(args.dry_run)
  if not (args.yes or args.dry_run):
    raise _pod.UsageError(f"this deletes {pod.describe()}: pass --yes")
  if args.run_name:
    statuses = _pod.stop_run(pod, args.run_name, args.grace_s, runner)
    if statuses and _pod.summarize(pod, statuses)["running"]:
      raise _pod.CommandFailed("some workers are still running; nothing deleted")
  runner.run(_pod.delete_command(pod))
  if not args.dry_run:
    print(f"deleted {pod.describe()}")
  return 0


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser()))
