#!/usr/bin/env python3
"""Create the TPU capacity: a queued resource (one or several slices) or a TPU VM.

The preflight gate runs first: the run's train step is compiled for this topology on
this machine (mm1-aot, memory only) and nothing is created when it does not fit.

  python tpu_scripts/create.py @pod.flags --capacity=spot --gin_file=gin/pods/mm1_7b_v5p-256.gin
  python tpu_scripts/create.py --name=mm1-7b --project=my-proj --zone=us-east5-a \\
      --accelerator_type=v5p-256 --num_slices=2 --capacity=reserved --gin_file=... --dry_run

Waits until the capacity is ACTIVE (queued) or READY (VM) unless --no_wait.
"""

import _pod


def build_parser():
  p = _pod.parser("create.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--capacity", choices=_pod.CAPACITY, default="on-demand",
                 help="on-demand, spot (preemptible, cheaper), reserved (your reservation) or "
                      "best-effort (queued resources only)")
  p.add_argument("--network", default=None)
  p.add_argument("--subnetwork", default=None)
  p.add_argument("--valid_until", default=None, metavar="DURATION",
                 help="queued resources: give up waiting after this long, e.g. 6h")
  p.add_argument("--gin_file", action="append", default=[],
                 help="the run's gin files, for the preflight gate (repeatable; --gin.X=V too)")
  _pod.add_gate_flags(p)
  p.add_argument("--no_wait", action="store_true", help="return once the request is made")
  p.add_argument("--ready_timeout_s", type=float, default=24 * 3600)
  p.add_argument("--poll_s", type=float, default=30)
  return p


def run(args, gin_flags):
  pod = _pod.pod_from_args(args)
  runner = _pod.Runner(args.dry_run)
  create_cmd = _pod.create_command(pod, args.capacity, args.network, args.subnetwork, args.valid_until)
  if args.gin_file:
    sha = _pod.resolve_commit("HEAD")
    _pod.check_tracked(sha, args.gin_file)
    _pod.preflight(pod, sha, args.gin_file, _pod.slice_flags(pod, gin_flags), runner, args.skip_preflight,
                   args.preflight_timeout_s)
  elif not args.skip_preflight:
    raise _pod.UsageError("give the run's --gin_file for the preflight gate (or --skip_preflight)")
  runner.run(create_cmd)
  if not args.no_wait:
    _pod.wait_until_ready(pod, runner, args.ready_timeout_s, args.poll_s)
  if not args.dry_run:
    print(f"created {pod.describe()}")
  return 0


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser(), gin=True))
