"""What the tpu_scripts share: the pod description, gcloud command lines, the preflight gate.

Every command is an argument list run without a shell. Commands that run on the TPU
workers travel as one string (gcloud's `--command`); it is assembled with shlex.quote
around every value that came from the user, so nothing is pasted into a shell unquoted.
With `--dry_run` the commands are printed (shlex-quoted, ready to copy) and nothing runs.

Where a run lives:
  gs://BUCKET/PREFIX/runs/<run_name>/   the workdir with --bucket=gs://BUCKET/PREFIX: checkpoints,
                                        metrics, config, goodput, written by mm1-train directly
  <shared_dir>/runs/<run_name>/         the workdir otherwise, on a mounted shared folder
  ~/mm1_jax/<commit[:12]>/              on every worker: the package at that commit, its .venv
Worker logs (one per worker, appended across relaunches on the same VM):
  ~/mm1_runs/<run_name>/logs/slice<S>-worker<W>.log   with a bucket workdir, on the worker's disk;
      each attempt's part is uploaded, whole and again every --log_upload_s, to
      <workdir>/logs/slice<S>-worker<W>/<UTC start>-<pid>.log (objects cannot be appended to)
  <workdir>/logs/slice<S>-worker<W>.log               with a mounted workdir
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # mm1_jax from this checkout, installed or not
  sys.path.insert(1, str(REPO))

from mm1_jax import gin_cli  # noqa: E402  (after the checkout is on the path)
from mm1_jax import goodput as goodput_lib  # noqa: E402  (standard library only)
from mm1_jax.paths import is_remote  # noqa: E402,F401  (a bucket URL rather than a folder; used by the scripts)

# Exit codes of every tpu_scripts command.
OK, FAILED, USAGE, REFUSED = 0, 1, 2, 3

# Software images (gcloud's --runtime-version / --version) that carry each generation's runtime.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
CAPACITY = ("on-demand", "spot", "reserved", "best-effort")
DEFAULT_SHARED_DIR = "/mnt/mm1"

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?")  # GCE resource names (room for "-<slice>")
_PROJECT = re.compile(r"[a-z][-a-z0-9.:]{4,62}[a-z0-9]")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommandFailed(Exception):
  """A gcloud or remote command failed; the script prints it and exits 1."""


# ---------------------------------------------------------------------------- the pod


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str
  project: str
  zone: str
  accelerator_type: str
  num_slices: int = 1
  mode: str = "queued"  # queued resources, or "vm": tpu-vm create (one slice)
  runtime_version: str = ""
  internal_ip: bool = False  # ssh/scp over internal IPs (runs inside the VPC)
  iap: bool = False  # ssh/scp through Identity-Aware Proxy

  @property
  def generation(self) -> str:
    return self.accelerator_type.rsplit("-", 1)[0]

  @property
  def num_chips(self) -> int:
    """Chips in one slice (v4 and v5p names count TensorCores, two a chip)."""
    from mm1_jax import aot  # noqa: PLC0415  (jax and the train step: only where a slice is sized)

    return aot.parse_topology(self.accelerator_type).num_chips

  @property
  def hosts_per_slice(self) -> int:
    """TPU VMs (workers) in one slice: 4 chips a host, single-host shapes up to 8 chips on v5e/v6e."""
    chips = self.num_chips
    if self.generation in ("v5litepod", "v5e", "v6e") and chips <= 8:
      return 1
    return max(1, chips // 4)

  @property
  def nodes(self) -> list[str]:
    """TPU node names: one per slice (queued resources name them <prefix>-<i>)."""
    if self.num_slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.num_slices)]

  @property
  def scope(self) -> list[str]:
    return [f"--project={self.project}", f"--zone={self.zone}"]

  def describe(self) -> str:
    slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
    return (f"{slices}{self.accelerator_type} ({self.num_chips * self.num_slices} chips, "
            f"{self.hosts_per_slice * self.num_slices} workers) '{self.name}' in {self.project}/{self.zone}")


def add_pod_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("the pod (the same on every tpu_scripts command; keep them in a file and "
                           "pass @FILE)")
  g.add_argument("--name", required=True, help="queued resource / TPU VM name; slices are NAME-0, NAME-1, ...")
  g.add_argument("--project", required=True, help="Google Cloud project")
  g.add_argument("--zone", required=True, help="zone, e.g. us-east5-a")
  g.add_argument("--accelerator_type", required=True,
                 help="one slice, as gcloud writes it: v4-128, v5p-256, v5litepod-256, v6e-64")
  g.add_argument("--num_slices", type=int, default=1, help="slices joined over the data-centre network")
  g.add_argument("--mode", choices=("queued", "vm"), default="queued",
                 help="queued: queued resources (needed for several slices); vm: tpu-vm create")
  g.add_argument("--runtime_version", default=None,
                 help="TPU software version (default by generation: "
                      + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items() if k != "v5e") + ")")
  g.add_argument("--internal_ip", action="store_true", help="ssh/scp to internal IPs (from inside the VPC)")
  g.add_argument("--iap", action="store_true", help="ssh/scp through Identity-Aware Proxy")
  g.add_argument("--bucket", default=None, metavar="gs://BUCKET[/PREFIX]", help=BUCKET_HELP)
  p.add_argument("--dry_run", action="store_true",
                 help="print the exact commands, in order, and run nothing")


def pod_from_args(args: argparse.Namespace) -> Pod:
  from mm1_jax import aot  # noqa: PLC0415  (jax and the train step: only where a slice is sized)

  for flag, value, pattern in (("--name", args.name, _NAME), ("--project", args.project, _PROJECT),
                               ("--zone", args.zone, _ZONE)):
    if not pattern.fullmatch(value):
      raise UsageError(f"{flag}={value!r} is not a valid value (expected {pattern.pattern})")
  try:
    aot.parse_topology(args.accelerator_type)
  except ValueError as e:
    raise UsageError(f"--accelerator_type: {e}") from None
  if args.num_slices < 1:
    raise UsageError("--num_slices must be at least 1")
  if args.num_slices > 1 and args.mode != "queued":
    raise UsageError("several slices need queued resources: use --mode=queued")
  if args.bucket is not None:
    args.bucket = parse_bucket_url(args.bucket)
  generation = args.accelerator_type.rsplit("-", 1)[0]
  return Pod(name=args.name, project=args.project, zone=args.zone, accelerator_type=args.accelerator_type,
             num_slices=args.num_slices, mode=args.mode,
             runtime_version=args.runtime_version or RUNTIME_VERSIONS[generation],
             internal_ip=args.internal_ip, iap=args.iap)


# The run folder (bucket or mount) and reading it: tpu_scripts/_run_folder.py.
from _run_folder import (  # noqa: E402,F401  (re-exported for the scripts)
    BUCKET_HELP, UsageError, bucket_name_problem, parse_bucket_url, check_workdir, add_run_folder_flags, run_folder, check_run_folder_args, _tail_bytes, read_run_folder, metrics_line)


# ---------------------------------------------------------------------------- gcloud commands


def gcloud() -> str:
  return os.environ.get("MM1_GCLOUD", "gcloud")


def create_command(pod: Pod, capacity: str, network: str | None = None, subnetwork: str | None = None,
                   valid_until: str | None = None) -> list[str]:
  net = ([f"--network={network}"] if network else []) + ([f"--subnetwork={subnetwork}"] if subnetwork else [])
  if pod.mode == "queued":
    cmd = [gcloud(), "compute", "tpus", "queued-resources", "create", pod.name, *pod.scope,
           f"--accelerator-type={pod.accelerator_type}", f"--runtime-version={pod.runtime_version}"]
    if pod.num_slices == 1:
      cmd.append(f"--node-id={pod.name}")
    else:
      cmd += [f"--node-count={pod.num_slices}", f"--node-prefix={pod.name}"]
    if capacity != "on-demand":
      cmd.append(f"--{capacity}")
    if valid_until:
      cmd.append(f"--valid-until-duration={valid_until}")
    if pod.internal_ip:
      cmd.append("--internal-ips")
    return cmd + net
  if capacity == "best-effort":
    raise UsageError("--capacity=best-effort needs queued resources (--mode=queued)")
  if valid_until:
    raise UsageError("--valid_until applies to queued resources (--mode=queued)")
  cmd = [gcloud(), "compute", "tpus", "tpu-vm", "create", pod.name, *pod.scope,
         f"--accelerator-type={pod.accelerator_type}", f"--version={pod.runtime_version}"]
  if capacity != "on-demand":
    cmd.append(f"--{capacity}")
  if pod.internal_ip:
    cmd.append("--internal-ips")
  return cmd + net


def state_command(pod: Pod) -> list[str]:
  if pod.mode == "queued":
    return [gcloud(), "compute", "tpus", "queued-resources", "describe", pod.name, *pod.scope,
            "--format=value(state.state)"]
  return [gcloud(), "compute", "tpus", "tpu-vm", "describe", pod.name, *pod.scope, "--format=value(state)"]


def delete_command(pod: Pod) -> list[str]:
  if pod.mode == "queued":  # --force deletes the nodes with the request
    return [gcloud(), "compute", "tpus", "queued-resources", "delete", pod.name, *pod.scope, "--force",
            "--quiet"]
  return [gcloud(), "compute", "tpus", "tpu-vm", "delete", pod.name, *pod.scope, "--quiet"]


def _ssh_flags(pod: Pod) -> list[str]:
  return (["--internal-ip"] if pod.internal_ip else []) + (["--tunnel-through-iap"] if pod.iap else [])


def ssh_command(pod: Pod, node: str, remote: str) -> list[str]:
  """Runs `remote` on every worker of one slice (gcloud runs them in parallel)."""
  return [gcloud(), "compute", "tpus", "tpu-vm", "ssh", node, *pod.scope, "--worker=all",
          f"--command={remote}", *_ssh_flags(pod)]


def scp_command(pod: Pod, node: str, local: str, remote: str) -> list[str]:
  return [gcloud(), "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", *pod.scope,
          "--worker=all", *_ssh_flags(pod)]


# Resource states, as gcloud reports them; any other (ACCEPTED, WAITING_FOR_RESOURCES,
# PROVISIONING, CREATING, ...) means: wait.
READY_STATES = {"ACTIVE", "READY"}
LOST_STATES = {"SUSPENDING", "SUSPENDED", "FAILED", "PREEMPTED", "TERMINATED", "STOPPED", "STOPPING",
               "DELETING", "MISSING"}


# ---------------------------------------------------------------------------- running


class Runner:
  """Runs argument lists (no shell) or, with dry_run, prints them."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def show(self, cmd: list[str], note: str = "") -> None:
    line = shlex.join(cmd)
    print(f"{line}{'    # ' + note if note else ''}" if self.dry_run else f"+ {line}",
          file=sys.stdout if self.dry_run else sys.stderr, flush=True)

  def run(self, cmd: list[str], capture: bool = False, check: bool = True, note: str = "",
          quiet: bool = False) -> subprocess.CompletedProcess | None:
    if self.dry_run or not quiet:
      self.show(cmd, note)
    if self.dry_run:
      return None
    try:
      proc = subprocess.run(cmd, text=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
      raise CommandFailed(f"{cmd[0]}: command not found (install the Google Cloud CLI, or set "
                          f"MM1_GCLOUD)") from None
    if check and proc.returncode != 0:
      detail = (proc.stderr or "").strip().splitlines()[-3:] if capture else []
      raise CommandFailed(f"exit {proc.returncode}: {shlex.join(cmd)[:300]}"
                          + ("\n  " + "\n  ".join(detail) if detail else ""))
    return proc

  def run_per_node(self, plans: dict[str, list[list[str]]], what: str, check: bool = True) -> dict[str, str]:
    """Runs each node's commands in order, the nodes in parallel; returns each node's output.

    A dry run prints node after node. With `check`, failures are collected and raised
    together; without, a node's output is whatever it printed.
    """
    if self.dry_run:
      for cmds in plans.values():
        for cmd in cmds:
          self.show(cmd)
      return {}
    outputs: dict[str, str] = {}
    errors = []

    def one(node):
      out = []
      for cmd in plans[node]:
        proc = self.run(cmd, capture=True, check=False)
        out.append(proc.stdout)
        if proc.returncode != 0 and check:
          tail = "\n    ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
          raise CommandFailed(f"{node}: exit {proc.returncode} from {shlex.join(cmd)[:200]}\n    {tail}")
      return "".join(out)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(plans))) as pool:
      futures = {pool.submit(one, node): node for node in plans}
      done = 0
      for fut in concurrent.futures.as_completed(futures):
        done += 1
        node = futures[fut]
        try:
          outputs[node] = fut.result()
          print(f"[{done}/{len(plans)}] {what}: {node} done", file=sys.stderr, flush=True)
        except CommandFailed as e:
          errors.append(str(e))
          print(f"[{done}/{len(plans)}] {what}: {node} FAILED", file=sys.stderr, flush=True)
    if errors:
      raise CommandFailed("\n".join(errors))
    return outputs


def resource_state(pod: Pod, runner: Runner) -> str:
  """ACTIVE / READY / WAITING_FOR_RESOURCES / SUSPENDED / ... or MISSING when it does not exist."""
  proc = runner.run(state_command(pod), capture=True, check=False, quiet=True)
  if proc is None:
    return "ACTIVE"  # dry run: show the commands of the healthy path
  if proc.returncode != 0:
    if re.search(r"NOT_FOUND|not found|was not found", proc.stderr or "", re.I):
      return "MISSING"
    raise CommandFailed(f"cannot read the state of {pod.name}: {(proc.stderr or '').strip()[-300:]}")
  return (proc.stdout.strip().splitlines() or ["UNKNOWN"])[-1].strip()


def wait_until_ready(pod: Pod, runner: Runner, timeout_s: float, poll_s: float) -> None:
  """Polls the resource until it is ACTIVE/READY; raises on a lost state or timeout."""
  if runner.dry_run:
    runner.show(state_command(pod), note="repeated until ACTIVE" if pod.mode == "queued" else "until READY")
    return
  start = time.time()
  last = None
  while True:
    state = resource_state(pod, runner)
    waited = time.time() - start
    if state != last:
      print(f"{pod.name}: {state} after {waited:.0f} s", file=sys.stderr, flush=True)
      last = state
    if state in READY_STATES:
      return
    if state in LOST_STATES - {"MISSING"} or (state == "MISSING" and waited > 60):
      raise CommandFailed(f"{pod.name} is {state}; it will not become ready")
    if waited > timeout_s:
      raise CommandFailed(f"{pod.name} still {state} after {timeout_s:.0f} s (--ready_timeout_s)")
    time.sleep(poll_s)


# ---------------------------------------------------------------------------- the code on the workers


def resolve_commit(commit: str) -> str:
  proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise UsageError(f"--commit={commit!r} is not a commit of {REPO}")
  return proc.stdout.strip()


def tree_differs(sha: str, paths: list[str] | None = None) -> bool:
  """True when the working tree (tracked files) differs from `sha`."""
  cmd = ["git", "-C", str(REPO), "diff", "--quiet", sha, "--", *(paths or [])]
  return subprocess.run(cmd, capture_output=True).returncode != 0


def check_tracked(sha: str, paths: list[str]) -> None:
  """Every gin file must be part of the commit the workers run (paths relative to the repo)."""
  for path in paths:
    rel = os.path.relpath(os.path.abspath(path), REPO) if os.path.isabs(path) else path
    proc = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{sha}:{rel}"], capture_output=True)
    if rel.startswith("..") or proc.returncode != 0:
      raise UsageError(f"--gin_file={path}: not in commit {sha[:12]}; the workers only have the commit's "
                       f"files (commit it, then run setup_workers.py)")


def remote_dir(sha: str) -> str:
  """The commit's folder on a worker, as shell text ($HOME expands there)."""
  return f'"$HOME"/mm1_jax/{sha[:12]}'


def archive_path(sha: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"mm1_jax-{sha[:12]}.tar.gz")


def archive_command(sha: str) -> list[str]:
  return ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--prefix=mm1_jax-{sha[:12]}/",
          f"--output={archive_path(sha)}", sha]


def worker_command(sha: str, action: str, args: list[str], python: str = ".venv/bin/python") -> str:
  """Shell text that runs tpu_scripts/worker.py ACTION ARGS in the commit's folder on a worker."""
  d = remote_dir(sha)
  return (f"cd {d} 2>/dev/null || {{ echo \"mm1_jax {sha[:12]} is not set up on $(hostname): run "
          f"tpu_scripts/setup_workers.py\" >&2; exit 4; }}; {python} tpu_scripts/worker.py "
          + shlex.join([action, *args]))


# ---------------------------------------------------------------------------- training flags


def split_gin_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """Takes --gin.NAME=VALUE (or --gin.NAME VALUE) out of argv, as mm1-train will read them."""
  try:
    return gin_cli.split_flags(argv)
  except ValueError as e:
    raise UsageError(str(e)) from None


def add_run_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("the run (mm1-train on every worker)")
  g.add_argument("--run_name", required=True, help="names the run's processes, logs and default workdir")
  g.add_argument("--gin_file", action="append", default=[],
                 help="gin file, relative to the repository (repeatable), e.g. gin/pods/mm1_7b_v5p-256.gin")
  g.add_argument("--workdir", default=None,
                 help="run folder every worker reaches, a gs:// URL or a path on a mounted folder "
                      "(default: --bucket's gs://BUCKET/PREFIX/runs/RUN_NAME, else --shared_dir/runs/RUN_NAME)")
  g.add_argument("--shared_dir", default=DEFAULT_SHARED_DIR,
                 help="without --bucket: the folder mounted on every worker by setup_workers.py --nfs or "
                      "--gcs_bucket (default %(default)s)")
  g.add_argument("--log_upload_s", type=float, default=300,
                 help="with a bucket workdir: upload each worker's log this often, and when it ends (0: only "
                      "when it ends)")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment for mm1-train on the workers (repeatable), e.g. MM1_EVAL_DATA=/mnt/mm1/eval")
  g.add_argument("--train_flag", action="append", default=[], metavar="FLAG",
                 help="another mm1-train flag, passed as given (repeatable), e.g. --train_flag=--allow_config_change")
  g.add_argument("--commit", default="HEAD", help="the commit the workers run (set up by setup_workers.py)")
  g.add_argument("--allow_dirty", action="store_true",
                 help="go ahead although the working tree differs from --commit (the preflight then "
                      "checks the working tree, not what the workers run)")
  g.add_argument("--megascale_coordinator", default=None, metavar="HOST",
                 help="set MEGASCALE_* on the workers with this host as coordinator; by default the "
                      "values queued resources put in the TPU metadata are used")
  add_gate_flags(p)


def add_gate_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("preflight gate (mm1-aot, on this machine, before anything is created or started)")
  g.add_argument("--skip_preflight", action="store_true",
                 help="do not run the preflight: go ahead whether or not the step fits")
  g.add_argument("--preflight_timeout_s", type=float, default=3600)


def check_run_args(args: argparse.Namespace) -> None:
  if not _RUN_NAME.fullmatch(args.run_name):
    raise UsageError(f"--run_name={args.run_name!r}: letters, digits, '.', '_' and '-' only")
  if not args.gin_file:
    raise UsageError("give the run's --gin_file (e.g. gin/pods/mm1_7b_v5p-256.gin)")
  if args.workdir is None:
    args.workdir = (f"{args.bucket}/runs/{args.run_name}" if args.bucket
                    else f"{args.shared_dir.rstrip('/')}/runs/{args.run_name}")
  args.workdir = check_workdir(args.workdir)
  if args.log_upload_s < 0:
    raise UsageError("--log_upload_s must be 0 or more")
  for item in args.env:
    key = item.split("=", 1)[0]
    if "=" not in item or not _ENV_KEY.fullmatch(key):
      raise UsageError(f"--env={item!r}: expected KEY=VALUE")
  for flag in args.train_flag:
    if not flag.startswith("--"):
      raise UsageError(f"--train_flag={flag!r}: expected an mm1-train flag such as --allow_config_change")
    if flag.split("=", 1)[0] in ("--workdir", "--gin_file") or flag.startswith("--gin."):
      raise UsageError(f"--train_flag={flag!r}: give --workdir / --gin_file / --gin.X directly")


def train_argv(args: argparse.Namespace, gin_flags: list[str]) -> list[str]:
  """mm1-train's arguments on every worker (relative to the commit's folder)."""
  return ([".venv/bin/mm1-train"] + [f"--gin_file={f}" for f in args.gin_file] + gin_flags
          + [f"--workdir={args.workdir}"] + args.train_flag)


def launch_remote(pod: Pod, sha: str, args: argparse.Namespace, gin_flags: list[str], slice_id: int) -> str:
  wargs = ["--run_name", args.run_name, "--workdir", args.workdir, "--slice_id", str(slice_id),
           "--num_slices", str(pod.num_slices), "--hosts_per_slice", str(pod.hosts_per_slice)]
  if is_remote(args.workdir):
    wargs += ["--log_upload_s", f"{args.log_upload_s:g}"]
  for item in args.env:
    wargs += ["--env", item]
  if getattr(args, "megascale_coordinator", None):
    wargs += ["--megascale_coordinator", args.megascale_coordinator]
  return worker_command(sha, "start", wargs + ["--", *train_argv(args, gin_flags)])


def worker_args(args: argparse.Namespace, slice_id: int) -> list[str]:
  return ["--run_name", args.run_name, "--workdir", args.workdir, "--slice_id", str(slice_id)]


# ---------------------------------------------------------------------------- the preflight gate


def _preflight_cache_dir() -> Path:
  return Path(os.environ.get("MM1_PREFLIGHT_CACHE") or Path.home() / ".cache" / "mm1_jax" / "preflight")


def preflight(pod: Pod, sha: str, gin_files: list[str], gin_flags: list[str], runner: Runner,
              skip: bool, timeout_s: float) -> dict | None:
  """Compiles the step for the pod's topology with mm1-aot (memory only) and refuses a misfit.

  The verdict is cached by (commit, working-tree diff, flags, topology, libtpu version), so
  create and launch of the same run compile once.
  """
  cmd = [sys.executable, "-m", "mm1_jax.aot", *[f"--gin_file={f}" for f in gin_files], *gin_flags,
         f"--topology={pod.accelerator_type}", f"--num_slices={pod.num_slices}", "--no_cost"]
  if skip:
    print("preflight: skipped (--skip_preflight); nothing checks that the step fits", file=sys.stderr)
    return None
  if runner.dry_run:
    runner.show(cmd + ["--json_out=REPORT"], note="preflight on this machine; refuses if it does not fit")
    return None
  diff = subprocess.run(["git", "-C", str(REPO), "diff", sha], capture_output=True, text=True).stdout
  try:
    libtpu = metadata.version("libtpu")
  except Exception:  # noqa: BLE001
    libtpu = "none"
  key = hashlib.sha256(json.dumps([sha, diff, cmd[3:], libtpu]).encode()).hexdigest()[:24]
  cached = _preflight_cache_dir() / f"{key}.json"
  report = None
  if cached.exists():
    report = json.loads(cached.read_text())
    print(f"preflight: reusing the verdict in {cached}", file=sys.stderr)
  else:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # simulated CPU devices have no place in a TPU compile
    print(f"preflight: compiling the step for {pod.describe()} (mm1-aot, memory only) ...",
          file=sys.stderr, flush=True)
    runner.show(cmd + [f"--json_out={tmp}"])
    try:
      proc = subprocess.run(cmd + [f"--json_out={tmp}"], cwd=REPO, env=env, text=True, capture_output=True,
                            timeout=timeout_s)
    except subprocess.TimeoutExpired:
      proc = None
    if proc is not None:
      sys.stderr.write(proc.stdout)
    if proc is not None and proc.returncode in (0, 1) and tmp.exists():
      report = json.loads(tmp.read_text())
      tmp.replace(cached)
    else:
      why = ("timed out" if proc is None else
             (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
      raise Refused(f"preflight: the step could not be compiled for {pod.accelerator_type}: {why}\n"
                    "Nothing was created or started. Fix the config, or pass --skip_preflight.")
  gib = 2 ** 30
  summary = (f"{report['per_chip_bytes'] / gib:.1f} of {report['hbm_bytes'] / gib:.0f} GiB a chip on "
             f"{report['topology']}" + (f" x {report['num_slices']}" if report.get("num_slices", 1) > 1 else ""))
  if report["fits"]:
    print(f"preflight: fits ({summary})", file=sys.stderr)
  else:
    raise Refused(f"preflight: the train step does not fit: {summary}.\n"
                  "Nothing was created or started. Change the model, batch, mesh or topology, or pass "
                  "--skip_preflight to go ahead anyway.")
  return report


class Refused(Exception):
  """The preflight gate said no; the script prints why and exits 3."""


# ---------------------------------------------------------------------------- entry


def main(run, parser: argparse.ArgumentParser, argv: list[str] | None = None, gin: bool = False) -> int:
  """Parses flags (gin flags aside when `gin`), runs `run(args, gin_flags)`, maps errors to exit codes."""
  argv = list(sys.argv[1:] if argv is None else argv)
  argv = _expand_flagfiles(argv)
  gin_flags: list[str] = []
  try:
    if gin:
      argv, gin_flags = split_gin_flags(argv)
    args = parser.parse_args(argv)
    return run(args, gin_flags) or OK
  except UsageError as e:
    print(f"{parser.prog}: {e}", file=sys.stderr)
    return USAGE
  except Refused as e:
    print(f"{parser.prog}: {e}", file=sys.stderr)
    return REFUSED
  except CommandFailed as e:
    print(f"{parser.prog}: {e}", file=sys.stderr)
    return FAILED
  except KeyboardInterrupt:
    print(f"{parser.prog}: interrupted", file=sys.stderr)
    return 130


def _expand_flagfiles(argv: list[str]) -> list[str]:
  """@FILE arguments: one flag a line, '#' comments; the pod flags kept in one place."""
  out = []
  for arg in argv:
    if arg.startswith("@") and len(arg) > 1:
      path = Path(arg[1:])
      if not path.exists():
        raise SystemExit(f"error: flag file {path} not found")
      for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
          out.append(line)
    else:
      out.append(arg)
  return out


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="exit codes: 0 done; 1 a gcloud or worker command failed; 2 bad "
                                        "arguments; 3 refused by the preflight gate")


# ---------------------------------------------------------------------------- jobs: setup, launch, status, stop


def add_setup_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("worker setup (with --bucket nothing is mounted: each worker checks it can write there)")
  m = g.add_mutually_exclusive_group()
  m.add_argument("--nfs", default=None, metavar="SERVER:/EXPORT",
                 help="instead of --bucket, or for data beside it: mount this NFS export (e.g. Filestore) at "
                      "--shared_dir on every worker")
  m.add_argument("--gcs_bucket", default=None, metavar="BUCKET_NAME",
                 help="instead of --bucket: mount this bucket with gcsfuse at --shared_dir (its renames are not "
                      "atomic; --bucket needs no mount)")
  g.add_argument("--python", default="3.11", help="Python for the workers' virtual environment (via uv)")
  g.add_argument("--reinstall", action="store_true", help="install again even where it is already set up")


def setup_plans(pod: Pod, sha: str, args: argparse.Namespace) -> dict[str, list[list[str]]]:
  """Per node: copy the commit's archive to all workers, unpack it, run remote_setup.sh."""
  tarball = f"mm1_jax-{sha[:12]}.tar.gz"
  d = remote_dir(sha)
  setup_args = ["--python", args.python, "--shared_dir", args.shared_dir]
  if getattr(args, "bucket", None):
    setup_args += ["--bucket", args.bucket]
  if args.nfs:
    setup_args += ["--nfs", args.nfs]
  if args.gcs_bucket:
    setup_args += ["--gcs_bucket", args.gcs_bucket]
  if args.reinstall:
    setup_args.append("--reinstall")
  remote = (f"set -e; mkdir -p {d}; tar -xzf \"$HOME\"/{tarball} --strip-components=1 -C {d}; "
            f"bash {d}/tpu_scripts/remote_setup.sh " + shlex.join(setup_args))
  return {node: [scp_command(pod, node, archive_path(sha), tarball), ssh_command(pod, node, remote)]
          for node in pod.nodes}


def check_setup_args(args: argparse.Namespace) -> None:
  if args.gcs_bucket is not None:
    name = args.gcs_bucket
    if name.startswith("gs://"):
      raise UsageError(f"--gcs_bucket={name!r}: gcsfuse takes a bucket name; to keep runs in the bucket without "
                       f"a mount, pass --bucket={name}")
    problem = bucket_name_problem(name)
    if problem:
      raise UsageError(f"--gcs_bucket={name!r}: {problem}")


def setup_workers(pod: Pod, sha: str, args: argparse.Namespace, runner: Runner) -> None:
  if not runner.dry_run and tree_differs(sha):
    print(f"note: the working tree differs from {sha[:12]}; the workers get the commit, not those changes",
          file=sys.stderr)
  runner.run(archive_command(sha), note="the commit, packed on this machine")
  runner.run_per_node(setup_plans(pod, sha, args), "setup")


def launch(pod: Pod, sha: str, args: argparse.Namespace, gin_flags: list[str], runner: Runner) -> None:
  plans = {node: [ssh_command(pod, node, launch_remote(pod, sha, args, gin_flags, i))]
           for i, node in enumerate(pod.nodes)}
  runner.run_per_node(plans, "launch")


def run_remote(run_name: str, action: str, args: list[str]) -> str:
  """Shell text running worker.py ACTION in the folder of the commit that started RUN_NAME."""
  code = f'"$HOME"/.mm1_jax/runs/{shlex.quote(run_name)}/code'
  not_started = "printf 'MM1_WORKER {\"state\": \"not started\", \"host\": \"%s\"}\\n' \"$(hostname)\""
  return (f"cd {code} 2>/dev/null || {{ {not_started}; exit 0; }}; .venv/bin/python tpu_scripts/worker.py "
          + shlex.join([action, "--run_name", run_name, *args]))


def worker_statuses(pod: Pod, run_name: str, runner: Runner, tail_lines: int = 0) -> tuple[list[dict], list[str]]:
  """Each worker's status (and, with tail_lines, its last log lines), from every node."""
  plans = {}
  for i, node in enumerate(pod.nodes):
    remote = run_remote(run_name, "status", ["--slice_id", str(i)])
    if tail_lines:
      remote += "; " + run_remote(run_name, "tail", ["--slice_id", str(i), "--lines", str(tail_lines)])
    plans[node] = [ssh_command(pod, node, remote)]
  outputs = runner.run_per_node(plans, "status", check=False)
  statuses, lines = [], []
  for i, node in enumerate(pod.nodes):
    for line in (outputs.get(node) or "").splitlines():
      if line.startswith("MM1_WORKER "):
        try:
          info = json.loads(line[len("MM1_WORKER "):])
        except ValueError:
          continue
        info.setdefault("slice", i)
        info["node"] = node
        statuses.append(info)
      elif line.startswith("[slice "):
        lines.append(line)
  return statuses, lines


def summarize(pod: Pod, statuses: list[dict]) -> dict:
  """Counts workers by state against the pod's worker count."""
  expected = pod.hosts_per_slice * pod.num_slices
  seen = {(s.get("slice"), s.get("worker")) for s in statuses if s.get("worker") is not None}
  by_state: dict[str, int] = {}
  for s in statuses:
    by_state[s["state"]] = by_state.get(s["state"], 0) + 1
  codes = sorted({s["exit_code"] for s in statuses if s.get("exit_code") is not None})
  return {"expected": expected, "answered": len(seen), "running": by_state.get("running", 0),
          "by_state": by_state, "exit_codes": codes}


def goodput_summary(statuses: list[dict]) -> dict | None:
  """The newest goodput summary any worker read from the run's <workdir>/goodput.json."""
  found = [s["goodput"] for s in statuses if isinstance(s.get("goodput"), dict)]
  found.sort(key=lambda g: g.get("updated") if isinstance(g.get("updated"), (int, float)) else 0)
  return found[-1] if found else None


def goodput_line(statuses: list[dict], summary: dict | None = None) -> str | None:
  """'goodput 81.3 % of 5.20 h over 3 attempts (...), as of 40 s ago', or None: from
  `summary` (read from the run folder) or else what the workers reported."""
  summary = summary if summary is not None else goodput_summary(statuses)
  if summary is None:
    return None
  line = goodput_lib.describe(summary)
  updated = summary.get("updated")
  if isinstance(updated, (int, float)):
    line += f", as of {max(0, time.time() - updated):.0f} s ago"
  return line


def stop_run(pod: Pod, run_name: str, grace_s: float, runner: Runner) -> list[dict]:
  plans = {node: [ssh_command(pod, node, run_remote(run_name, "stop", ["--slice_id", str(i), "--grace_s",
                                                                          str(grace_s)]))]
           for i, node in enumerate(pod.nodes)}
  outputs = runner.run_per_node(plans, "stop", check=False)
  return [json.loads(line[len("MM1_WORKER "):]) for out in outputs.values() for line in out.splitlines()
          if line.startswith("MM1_WORKER ")]


def slice_flags(pod: Pod, gin_flags: list[str]) -> list[str]:
  """The gin flags with NUM_SLICES set to the pod's slice count (a different value is refused)."""
  given = [f for f in gin_flags if f.split("=", 1)[0] == "--gin.NUM_SLICES"]
  for flag in given:
    if flag.split("=", 1)[1].strip() != str(pod.num_slices):
      raise UsageError(f"{flag} disagrees with --num_slices={pod.num_slices}")
  return gin_flags if given else gin_flags + [f"--gin.NUM_SLICES={pod.num_slices}"]


def prepare_run(pod: Pod, args: argparse.Namespace, gin_flags: list[str], runner: Runner) -> tuple[str, list[str]]:
  """Checks the run's flags and commit, runs the preflight gate; returns the commit's sha and
  the gin flags every worker gets (NUM_SLICES from the pod added)."""
  check_run_args(args)
  if hasattr(args, "gcs_bucket"):
    check_setup_args(args)
  gin_flags = slice_flags(pod, gin_flags)
  sha = resolve_commit(args.commit)
  check_tracked(sha, args.gin_file)
  if tree_differs(sha):
    if not args.allow_dirty:
      raise UsageError(f"the working tree differs from {sha[:12]} (the commit the workers run): commit "
                       "first, or pass --allow_dirty")
    print(f"note: the working tree differs from {sha[:12]}; the preflight checks the working tree",
          file=sys.stderr)
  preflight(pod, sha, args.gin_file, gin_flags, runner, args.skip_preflight, args.preflight_timeout_s)
  return sha, gin_flags
