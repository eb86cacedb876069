#!/usr/bin/env python3
"""Runs on each TPU worker: starts, reports on, tails and stops this worker's share of a run.

The tpu_scripts on your machine call it over `gcloud compute tpus tpu-vm ssh --worker=all`;
it needs only the Python standard library.

  worker.py start  --run_name R --workdir W --slice_id S [--env K=V ...] -- mm1-train ...
  worker.py status --run_name R --slice_id S     one line: MM1_WORKER {json}
  worker.py tail   --run_name R --slice_id S [--lines N]
  worker.py stop   --run_name R --slice_id S [--grace_s 600]
  worker.py probe  --workdir gs://BUCKET/PREFIX   can this host write there? (setup)

`start` detaches the command (it outlives the ssh session), appends its output to this
worker's log and records its pid and, when it ends, its exit code under
~/.mm1_jax/runs/<run_name>/ (this host's processes, so local). SIGTERM and SIGINT are
passed on to the command: mm1-train then saves a checkpoint and exits 143.

The log: with a workdir on a mounted folder, <workdir>/logs/slice<S>-worker<W>.log. With
a workdir in a bucket (gs://...), whose objects cannot be appended to, the log is on this
host's disk, ~/mm1_runs/<run_name>/logs/slice<S>-worker<W>.log, and the part of each
start (one attempt) is uploaded whole to <workdir>/logs/slice<S>-worker<W>/<UTC start
time>-<pid>.log every --log_upload_s and when the command ends, so the bucket keeps every
attempt's log after the VM is gone. Only the upload needs mm1_jax (etils.epath, from the
commit's virtual environment); the rest needs only the Python standard library.

`status` also reports the run's goodput, the "summary" of <workdir>/goodput.json
(mm1_jax/goodput.py), when the workdir is a local or mounted folder; a bucket workdir is
read by watch.py and supervise.py on the machine that runs them.
The worker number comes from the TPU metadata (agent-worker-number), or $MM1_WORKER_ID.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def worker_id(hosts_per_slice: int | None = None) -> int:
  if os.environ.get("MM1_WORKER_ID"):
    return int(os.environ["MM1_WORKER_ID"])
  try:
    req = urllib.request.Request(METADATA + "agent-worker-number", headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=5) as r:
      return int(r.read().decode().strip())
  except Exception:  # noqa: BLE001
    if hosts_per_slice == 1:
      return 0
    raise SystemExit("worker.py: cannot read agent-worker-number from the TPU metadata; set MM1_WORKER_ID")


def run_dir(run_name: str) -> Path:
  """This host's record of a run: pid and exit files, and `code`, a link to the commit's folder."""
  return Path.home() / ".mm1_jax" / "runs" / run_name


def _remote(path: str) -> bool:
  """A bucket URL (gs://...) rather than a folder on this host."""
  return "://" in path


def local_log_dir(run_name: str) -> Path:
  """Where the logs of a run with a bucket workdir are kept on this host."""
  return Path.home() / "mm1_runs" / run_name / "logs"


class Paths:
  def __init__(self, args: argparse.Namespace):
    self.slice_id = args.slice_id
    self.worker = worker_id(getattr(args, "hosts_per_slice", None))
    self.tag = f"slice{self.slice_id}-worker{self.worker}"
    self.state = run_dir(args.run_name) / f"{self.tag}.json"
    self.exit = self.state.with_suffix(".exit.json")
    if args.workdir:
      self.workdir = args.workdir
      self.log = (local_log_dir(args.run_name) if _remote(args.workdir) else Path(args.workdir) / "logs") \
          / f"{self.tag}.log"
    else:  # status, tail and stop find the log and workdir through the start record
      record = _read(self.state) or {}
      self.log = Path(record.get("log") or "/nonexistent")
      self.workdir = record.get("workdir") or str(self.log.parent.parent)  # <workdir>/logs/<tag>.log
    self.remote = _remote(self.workdir)
    # A bucket workdir: each start's part of the log goes to one object of its own, here.
    self.uploads = f"{self.workdir.rstrip('/')}/logs/{self.tag}" if self.remote else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # a zombie is not alive
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
  except OSError:
    return True


def _read(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _write(path: Path, data: dict) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data))
  tmp.replace(path)


def status(args: argparse.Namespace, paths: Paths | None = None) -> dict:
  paths = paths or Paths(args)
  info = {"run_name": args.run_name, "slice": paths.slice_id, "worker": paths.worker,
          "host": socket.gethostname(), "log": str(paths.log), "pid": None, "exit_code": None}
  if paths.state.exists():  # started here: where its folder and (bucket workdir) uploaded logs are
    info["workdir"] = paths.workdir
    if paths.uploads:
      info["log_uploads"] = paths.uploads
  state, ended = _read(paths.state), _read(paths.exit)
  if state is None:
    info["state"] = "not started"
  elif ended is not None and ended.get("pid") == state["pid"]:
    info.update(state="exited", pid=state["pid"], exit_code=ended["exit_code"], ended=ended["ended"])
  elif _alive(state["pid"]):
    info.update(state="running", pid=state["pid"], started=state["started"])
  else:
    info.update(state="lost", pid=state["pid"])  # killed without a word (SIGKILL, OOM, reboot)
  try:
    st = paths.log.stat()
    info["log_age_s"] = round(time.time() - st.st_mtime, 1)
    with paths.log.open("rb") as f:
      f.seek(max(0, st.st_size - 4096))
      lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    info["last_line"] = lines[-1][-300:] if lines else ""
  except OSError:
    info["log_age_s"], info["last_line"] = None, ""
  if not paths.remote:  # a bucket's ledger is read where watch.py / supervise.py run
    goodput = _read(Path(paths.workdir) / "goodput.json")
    if isinstance(goodput, dict) and isinstance(goodput.get("summary"), dict):
      info["goodput"] = goodput["summary"]
  return info


def _print_status(info: dict) -> None:
  print("MM1_WORKER " + json.dumps(info, sort_keys=True), flush=True)


def start(args: argparse.Namespace) -> int:
  if not args.command:
    raise SystemExit("worker.py start: give the command after --")
  paths = Paths(args)
  current = status(args, paths)
  if current["state"] == "running":
    print(f"worker.py: {args.run_name} already running here (pid {current['pid']})", file=sys.stderr)
    _print_status(current)
    return 1
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  for item in args.env:
    key, value = item.split("=", 1)
    env[key] = value
  if args.num_slices * args.hosts_per_slice > 1:
    env["MM1_DISTRIBUTED"] = "tpu"  # mm1_jax.distributed: jax.distributed.initialize() from the metadata
  if args.megascale_coordinator:
    env.update(MEGASCALE_COORDINATOR_ADDRESS=f"{args.megascale_coordinator}:{args.megascale_port}",
               MEGASCALE_PORT=str(args.megascale_port), MEGASCALE_NUM_SLICES=str(args.num_slices),
               MEGASCALE_SLICE_ID=str(args.slice_id))
  paths.log.parent.mkdir(parents=True, exist_ok=True)
  paths.state.parent.mkdir(parents=True, exist_ok=True)
  paths.exit.unlink(missing_ok=True)
  with paths.log.open("a") as log:
    if log.tell() > 0:  # the last run may have stopped mid-line (a progress bar)
      log.write("\n")
    log.flush()
    upload: list[str] = []
    if paths.uploads:  # this start's part of the log, from here on, to one object of its own
      stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
      upload = ["--upload", str(paths.log.absolute()), str(log.tell()),
                f"{paths.uploads}/{stamp}-{os.getpid()}.log", f"{args.log_upload_s:g}"]
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} slice {args.slice_id} worker "
              f"{paths.worker}: {shlex.join(args.command)}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_run", str(paths.exit), *upload, "--",
                             *args.command], env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
  _write(paths.state, {"pid": proc.pid, "started": time.time(), "command": args.command,
                       "log": str(paths.log.absolute()), "workdir": paths.workdir})
  code = run_dir(args.run_name) / "code"  # status/tail/stop run the worker.py of this commit
  tmp = code.with_name("code.tmp")
  tmp.unlink(missing_ok=True)
  tmp.symlink_to(Path(os.path.abspath(__file__)).parent.parent)
  tmp.replace(code)
  _print_status(status(args, paths))
  return 0


class LogUpload(threading.Thread):
  """Uploads the log from `offset` on to the object `target`, whole each time (an object
  cannot be appended to): every `every_s` seconds (0: never) and by `finish()`. A failed
  upload is noted in the log and tried again next time; it never stops the command."""

  def __init__(self, log: str, offset: int, target: str, every_s: float):
    super().__init__(daemon=True)
    self.log, self.offset, self.target, self.every_s = Path(log), offset, target, every_s
    self.stop = threading.Event()
    self.lock = threading.Lock()
    self.sent: bytes | None = None
    self.failures = 0

  def run(self) -> None:
    while not self.stop.wait(self.every_s if self.every_s > 0 else None):
      self.upload()

  def upload(self) -> bool:
    with self.lock:
      try:
        with self.log.open("rb") as f:
          f.seek(self.offset)
          data = f.read()
        if data == self.sent:
          return True
        repo = str(Path(__file__).resolve().parent.parent)
        if repo not in sys.path:
          sys.path.insert(1, repo)
        from mm1_jax import paths  # noqa: PLC0415  (etils: only where a log goes to a bucket)

        target = paths.path(self.target)
        if not paths.is_remote(self.target):
          target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)  # one object, replaced whole
        self.sent = data
        return True
      except Exception as e:  # noqa: BLE001  (a bucket client's errors are its own classes)
        self.failures += 1
        if self.failures in (1, 10, 100):
          print(f"=== worker.py: could not upload the log to {self.target} ({self.failures} failures): "
                f"{type(e).__name__}: {str(e)[:300]}", flush=True)
        return False

  def finish(self, timeout_s: float) -> None:
    self.stop.set()
    last = threading.Thread(target=self.upload, daemon=True)
    last.start()
    last.join(timeout_s)  # a bucket that does not answer must not keep the exit code unrecorded


def _run(exit_path: str, command: list[str], upload: list[str] | None = None) -> int:
  """The detached parent of the command: passes signals on, uploads the log where the
  workdir is a bucket, and records the exit code."""
  uploader = None
  if upload:
    log, offset, target, every_s = upload
    uploader = LogUpload(log, int(offset), target, float(every_s))
    uploader.start()
  child = subprocess.Popen(command)

  def forward(signum, _frame):
    print(f"=== worker.py: {signal.Signals(signum).name} received, passed on to pid {child.pid}", flush=True)
    child.send_signal(signum)

  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, forward)
  code = child.wait()
  code = 128 - code if code < 0 else code
  # One write: unbuffered, a separate newline could land after another thread's line (a bucket
  # client's warning during an upload).
  print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} exit code {code}\n", end="", flush=True)
  if uploader is not None:
    uploader.finish(timeout_s=120)
  _write(Path(exit_path), {"pid": os.getpid(), "exit_code": code, "ended": time.time()})
  return code


def stop(args: argparse.Namespace) -> int:
  paths = Paths(args)
  info = status(args, paths)
  if info["state"] == "running":
    pid = info["pid"]
    os.kill(pid, signal.SIGTERM)  # passed on to mm1-train: checkpoint, exit 143
    deadline = time.time() + args.grace_s
    while time.time() < deadline and status(args, paths)["state"] == "running":
      time.sleep(0.5)
    if status(args, paths)["state"] == "running":
      print(f"worker.py: still running after {args.grace_s:.0f} s; killing process group {pid}", file=sys.stderr)
      try:
        os.killpg(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  _print_status(status(args, paths))
  return 0


def tail(args: argparse.Namespace) -> int:
  paths = Paths(args)
  prefix = f"[slice {paths.slice_id} worker {paths.worker}] "
  try:
    lines = paths.log.read_text(errors="replace").splitlines()[-args.lines:]
  except OSError:
    lines = [f"(no log at {paths.log})"]
  for line in lines:
    print(prefix + line)
  return 0


def probe(args: argparse.Namespace) -> int:
  """Writes, reads back and deletes one small object under --workdir: does this host reach
  the bucket with write access?"""
  host = socket.gethostname()
  repo = str(Path(__file__).resolve().parent.parent)
  if repo not in sys.path:
    sys.path.insert(1, repo)
  try:
    from mm1_jax import paths  # noqa: PLC0415

    target = paths.path(args.workdir) / f".mm1_probe-{host}-{os.getpid()}"
    if not paths.is_remote(args.workdir):
      target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(host)
    ok = target.read_text() == host
    target.unlink()
  except Exception as e:  # noqa: BLE001
    print(f"worker.py: {host} cannot write to {args.workdir}: {type(e).__name__}: {str(e)[:300]}\n"
          "  The workers' service account needs to read and write objects there (for example the "
          "roles/storage.objectUser role on the bucket).", file=sys.stderr)
    return 1
  if not ok:
    print(f"worker.py: {host}: {args.workdir} did not give back what was written", file=sys.stderr)
    return 1
  print(f"MM1_SETUP {host}: can write to {args.workdir}", flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["_run"]:  # _run EXIT_PATH [--upload LOG OFFSET TARGET EVERY_S] -- COMMAND...
    i = argv.index("--")
    opts = argv[2:i]
    return _run(argv[1], argv[i + 1:], opts[1:5] if opts[:1] == ["--upload"] else None)
  command: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, command = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(prog="worker.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("action", choices=("start", "status", "tail", "stop", "probe"))
  p.add_argument("--run_name", default=None, help="the run (every action but probe)")
  p.add_argument("--workdir", default=None,
                 help="the run's folder, a path or gs:// URL (start and probe; the others read it from the start "
                      "record)")
  p.add_argument("--log_upload_s", type=float, default=300,
                 help="start, with a bucket workdir: upload the log this often, and at the end (0: at the end)")
  p.add_argument("--slice_id", type=int, default=0)
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--hosts_per_slice", type=int, default=None)
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--megascale_coordinator", default=None)
  p.add_argument("--megascale_port", type=int, default=8080)
  p.add_argument("--lines", type=int, default=20, help="tail: lines to show")
  p.add_argument("--grace_s", type=float, default=600, help="stop: seconds to wait for the checkpoint")
  args = p.parse_args(argv)
  args.command = command
  if args.action == "probe":
    if not args.workdir:
      p.error("probe needs --workdir")
    return probe(args)
  if not args.run_name:
    p.error(f"{args.action} needs --run_name")
  if args.action == "start":
    if args.hosts_per_slice is None or args.workdir is None:
      p.error("start needs --workdir and --hosts_per_slice")
    return start(args)
  if args.action == "status":
    _print_status(status(args))
    return 0
  return tail(args) if args.action == "tail" else stop(args)


if __name__ == "__main__":
  sys.exit(main())
