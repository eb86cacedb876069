#!/usr/bin/env python3
"""One command from nothing to a finished run: create, set up, launch, watch, relaunch.

  python tpu_scripts/supervise.py @pod.flags --capacity=spot --bucket=gs://my-bucket/mm1 \\
      --run_name=7b-a --gin_file=gin/pods/mm1_7b_v5p-256.gin [--dry_run]

The preflight gate runs once, first. Then, every --poll_s:
- capacity missing: create it, wait until ready, set up the workers, launch;
- capacity preempted, suspended or failed: delete it, create it again, set up, launch;
- the run failed on some worker (crash, killed, a worker replaced, a log silent for
  --stall_s): stop the others (SIGTERM: they checkpoint if they can), set up, launch again;
- every worker finished with exit code 0: done (exit 0);
- a worker exited 75 (mm1-train's hang watchdog: a step ran far past the recent median,
  every thread's stack is in <workdir>/hang_host<i>.txt): stop the others, relaunch;
- a worker exited 2 (bad config) or 3 (NaN/Inf loss, see docs/pods.md): stop, exit with
  that code; relaunching would fail the same way.
The run's goodput (<workdir>/goodput.json; a bucket workdir is read from this machine)
is logged at each restart, at the end, and every --goodput_every_s in between.
Every relaunch resumes from the newest checkpoint in the workdir, which must outlive the
workers: a bucket (--bucket=gs://BUCKET/PREFIX, workdir gs://BUCKET/PREFIX/runs/RUN_NAME,
no mount) or a shared folder mounted with --nfs / --gcs_bucket. Gives up after
--max_restarts.
"""

import sys
import time

import _pod
from _pod import goodput_lib

EXIT_HANG = goodput_lib.EXIT_HANG


def build_parser():
  p = _pod.parser("supervise.py", __doc__)
  _pod.add_pod_flags(p)
  p.add_argument("--capacity", choices=_pod.CAPACITY, default="on-demand")
  p.add_argument("--network", default=None)
  p.add_argument("--subnetwork", default=None)
  _pod.add_run_flags(p)
  _pod.add_setup_flags(p)
  g = p.add_argument_group("supervision")
  g.add_argument("--poll_s", type=float, default=120)
  g.add_argument("--ready_timeout_s", type=float, default=24 * 3600)
  g.add_argument("--max_restarts", type=int, default=20)
  g.add_argument("--stop_grace_s", type=float, default=300, help="seconds for the other workers to checkpoint")
  g.add_argument("--stall_s", type=float, default=0,
                 help="treat a worker whose log has not changed for this long as hung (0: never)")
  g.add_argument("--delete_when_done", action="store_true", help="delete the capacity after a clean finish")
  g.add_argument("--goodput_every_s", type=float, default=3600,
                 help="log the run's goodput this often while it runs (0: only at restarts and the end)")
  return p


class GiveUp(_pod.CommandFailed):
  """--max_restarts reached."""


def log(msg):
  print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervise: {msg}", file=sys.stderr, flush=True)


def verdict(pod, statuses, stall_s):
  """'done', 'running', 'not started', 'no answer', 'fatal:<code>' or 'failed:<why>'."""
  s = _pod.summarize(pod, statuses)
  codes = set(s["exit_codes"])
  if len(statuses) < s["expected"]:
    return f"no answer:{len(statuses)} of {s['expected']} workers answered"
  if s["by_state"].get("exited") == s["expected"] and codes == {0}:
    return "done"
  for fatal in (2, 3):
    if fatal in codes:
      return f"fatal:{fatal}"
  if EXIT_HANG in codes:
    hung = sum(1 for x in statuses if x.get("exit_code") == EXIT_HANG)
    return (f"failed:hang: {hung} worker(s) exited {EXIT_HANG} (a step ran past the hang deadline; "
            "stacks in <workdir>/hang_host*.txt)")
  if s["running"] == s["expected"]:
    stalled = [x for x in statuses if stall_s and (x.get("log_age_s") or 0) > stall_s]
    if stalled:
      return f"failed:{len(stalled)} worker(s) silent for over {stall_s:.0f} s"
    return "running"
  if s["running"] == 0 and not codes and s["by_state"].get("lost", 0) == 0:
    return "not started"
  return f"failed:{s['by_state']} exit codes {sorted(codes)}"


def run(args, gin_flags):
  pod = _pod.pod_from_args(args)
  runner = _pod.Runner(args.dry_run)
  sha, gin_flags = _pod.prepare_run(pod, args, gin_flags, runner)
  create_cmd = _pod.create_command(pod, args.capacity, args.network, args.subnetwork)

  def bring_up():
    runner.run(create_cmd)
    _pod.wait_until_ready(pod, runner, args.ready_timeout_s, min(args.poll_s, 30))
    start_run()

  def start_run():
    _pod.setup_workers(pod, sha, args, runner)
    _pod.launch(pod, sha, args, gin_flags, runner)

  if args.dry_run:
    print("# from nothing:")
    bring_up()
    print("# every --poll_s:")
    _pod.resource_state(pod, runner)
    _pod.worker_statuses(pod, args.run_name, runner)
    print("# when the capacity is preempted, suspended or failed:")
    runner.run(_pod.delete_command(pod))
    bring_up()
    print("# when the run failed on a worker:")
    _pod.stop_run(pod, args.run_name, args.stop_grace_s, runner)
    start_run()
    return 0

  restarts = 0
  silent_polls = 0
  last_statuses: list[dict] = []
  goodput_logged = time.time()

  def log_goodput():
    nonlocal goodput_logged
    goodput_logged = time.time()
    summary = None
    if _pod.is_remote(args.workdir):  # the workers do not read a bucket's ledger; this machine does
      folder = _pod.read_run_folder(args.workdir)
      summary = folder["goodput"]
      for error in folder["errors"]:
        log(f"cannot read {args.workdir}: {error}")
    line = _pod.goodput_line(last_statuses, summary)
    if line:
      log(line)

  def restart(why):
    nonlocal restarts
    if restarts >= args.max_restarts:
      log_goodput()
      raise GiveUp(f"giving up after {restarts} restarts; last: {why}")
    restarts += 1
    log(f"restart {restarts}/{args.max_restarts}: {why}")
    log_goodput()

  def step():
    """One look at the capacity and the run; returns an exit code when the run is over."""
    nonlocal silent_polls, last_statuses
    state = _pod.resource_state(pod, runner)
    if state == "MISSING":
      log(f"{pod.name} does not exist: creating {pod.describe()}")
      bring_up()
    elif state in _pod.LOST_STATES:
      restart(f"{pod.name} is {state}")
      if state != "DELETING":
        runner.run(_pod.delete_command(pod))
      while _pod.resource_state(pod, runner) != "MISSING":
        time.sleep(min(args.poll_s, 30))
      bring_up()
    elif state in _pod.READY_STATES:
      statuses, _ = _pod.worker_statuses(pod, args.run_name, runner)
      if _pod.goodput_summary(statuses) is not None:
        last_statuses = statuses
      v = verdict(pod, statuses, args.stall_s)
      silent_polls = silent_polls + 1 if v.startswith("no answer") else 0
      if v == "done":
        log(f"{args.run_name} finished on all {pod.hosts_per_slice * pod.num_slices} workers")
        log_goodput()
        if args.delete_when_done:
          runner.run(_pod.delete_command(pod))
        return 0
      if v.startswith("fatal:"):
        code = int(v.split(":")[1])
        log(f"a worker exited {code} ({'bad config' if code == 2 else 'non-finite loss'}); stopping the run, "
            "no relaunch: see the worker logs (watch.py)")
        _pod.stop_run(pod, args.run_name, args.stop_grace_s, runner)
        log_goodput()
        return code
      if v == "not started":
        log(f"starting {args.run_name} on {pod.describe()}")
        start_run()
      elif v.startswith("no answer"):  # ssh trouble: look again before acting
        log(v.replace("no answer:", "") + (f" ({silent_polls} polls in a row)" if silent_polls > 1 else ""))
        if silent_polls >= 5:
          silent_polls = 0
          restart("workers not answering")
          _pod.stop_run(pod, args.run_name, args.stop_grace_s, runner)
          start_run()
      elif v.startswith("failed:"):
        restart(v[len("failed:"):])
        _pod.stop_run(pod, args.run_name, args.stop_grace_s, runner)
        start_run()
      elif args.goodput_every_s and time.time() - goodput_logged >= args.goodput_every_s:
        log_goodput()
    else:
      log(f"{pod.name} is {state}; waiting")
    return None

  while True:
    try:
      code = step()
    except GiveUp:
      raise
    except _pod.CommandFailed as e:  # a failed gcloud call is one more reason to look again, not to quit
      restart(f"a command failed: {e}")
      code = None
    if code is not None:
      return code
    time.sleep(args.poll_s)


if __name__ == "__main__":
  raise SystemExit(_pod.main(run, build_parser(), gin=True))
