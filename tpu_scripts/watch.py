#!/usr/bin/env python3
"""Watch a run: the capacity's state, which workers are alive, and the tail of every worker's log.

  python tpu_scripts/watch.py @pod.flags --bucket=gs://my-bucket/mm1 --run_name=7b-a [--lines=5]
      [--follow] [--json]

Each worker reports running / exited (with its exit code) / lost (gone without an exit
code: killed, or its VM restarted) / not started, how long ago its log last changed
(a hung collective shows as a log that stops moving) and its last line; the tail of
every worker's log comes over ssh from the worker's disk.

With a bucket workdir (--bucket, --workdir=gs://..., or the one the workers report) this
machine reads the run folder itself: the newest record of metrics.jsonl and the run's
goodput as <workdir>/goodput.json last recorded it (docs/pods.md, "Goodput and hangs"),
and names where the workers upload their logs (<workdir>/logs/; fetch them with
`gcloud storage cp -r <workdir>/logs .`). With a mounted workdir the workers report the
goodput. --json prints one JSON object per poll for scripts. Exit code without --follow:
0 when every worker is running or all finished with 0, 1 otherwise.
"""

import json
import sys
import time

import _pod


def build_parser():
  p = _pod.parser("watch.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--run_name", required=True)
  p.add_argument("--lines", type=int, default=5, help="log lines to show from each worker (0: none)")
  p.add_argument("--follow", action="store_true", help="poll until interrupted")
  p.add_argument("--interval_s", type=float, default=60)
  p.add_argument("--json", action="store_true", help="machine-readable: one JSON object per poll")
  _pod.add_run_folder_flags(p)
  return p


def healthy(summary):
  return summary["running"] == summary["expected"] or (
      summary["by_state"].get("exited") == summary["expected"] and summary["exit_codes"] == [0])


def poll(pod, args, runner):
  state = _pod.resource_state(pod, runner)
  statuses, lines = ([], []) if state in _pod.LOST_STATES else _pod.worker_statuses(
      pod, args.run_name, runner, tail_lines=args.lines)
  summary = _pod.summarize(pod, statuses)
  if args.dry_run:
    return True
  workdir = _pod.run_folder(args, statuses)
  folder = _pod.read_run_folder(workdir) if workdir else {"goodput": None, "metrics": None, "errors": []}
  goodput = folder["goodput"] if folder["goodput"] is not None else _pod.goodput_summary(statuses)
  uploads = sorted({s["log_uploads"] for s in statuses if isinstance(s.get("log_uploads"), str)})
  if args.json:
    print(json.dumps({"time": time.time(), "resource": pod.name, "resource_state": state,
                      "run_name": args.run_name, **summary, "goodput": goodput, "workdir": workdir,
                      "metrics": folder["metrics"], "run_folder_errors": folder["errors"], "log_uploads": uploads,
                      "workers": statuses, "log_tail": lines}), flush=True)
    return healthy(summary)
  print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {pod.name}: {state}  run {args.run_name}: "
        f"{summary['running']}/{summary['expected']} workers running"
        + (f", {summary['by_state']}" if summary["running"] != summary["expected"] else ""))
  for s in sorted(statuses, key=lambda s: (s.get("slice", 0), s.get("worker") if s.get("worker") is not None
                                           else -1)):
    code = f" (exit {s['exit_code']})" if s.get("exit_code") is not None else ""
    age = f"log {s['log_age_s']:.0f} s ago" if s.get("log_age_s") is not None else "no log"
    print(f"  slice {s.get('slice')} worker {s.get('worker', '?')}  {s.get('host', '?')}  "
          f"{s['state']}{code}  {age}  | {s.get('last_line', '')[:120]}")
  if workdir:
    print(f"  {workdir}: " + (_pod.metrics_line(folder["metrics"]) if folder["metrics"] else "no metrics yet"))
  for error in folder["errors"]:
    print(f"  cannot read {workdir}: {error}")
  goodput_line = _pod.goodput_line(statuses, goodput)
  if goodput_line:
    print(f"  {goodput_line}")
  if uploads:
    logs = uploads[0].rsplit("/", 1)[0]
    print(f"  logs uploaded to {logs}/ (fetch: gcloud storage cp -r {logs} .)")
  for line in lines:
    print(line)
  sys.stdout.flush()
  return healthy(summary)


def run(args, _gin_flags):
  pod = _pod.pod_from_args(args)
  _pod.check_run_folder_args(args)
  runner = _pod.Runner(args.dry_run)
  while True:
    ok = poll(pod, args, runner)
    if not args.follow or args.dry_run:
      return _pod.OK if ok else _pod.FAILED
    time.sleep(args.interval_s)


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser()))
