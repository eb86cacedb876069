"""tpu_scripts/ against a fake `gcloud` first on PATH that records every call.

The fake (tests/helpers/fake_gcloud.py) answers from scripted rules, or runs ssh commands
with bash in a per-node home folder, as each TPU VM would: launch, watch and stop then
drive the real worker.py, which starts a stand-in for mm1-train.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
FAKE = Path(__file__).resolve().parent / "helpers" / "fake_gcloud.py"
SHA = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

V5P_2X = ["--name=mm1-7b", "--project=my-project", "--zone=us-east5-a", "--accelerator_type=v5p-16",
          "--num_slices=2"]
V5E_VM = ["--name=mm1-small", "--project=my-project", "--zone=us-west4-a", "--accelerator_type=v5litepod-4",
          "--mode=vm"]


class Pod:
  """A fake gcloud, its call log and rules, and a runner for the scripts."""

  def __init__(self, tmp: Path):
    self.tmp = tmp
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} \"$@\"\n")
    gcloud.chmod(0o755)
    self.log = tmp / "gcloud.log"
    self.log.touch()
    self.rules = tmp / "rules.json"
    self.env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                    FAKE_GCLOUD_RULES=str(self.rules), MM1_PREFLIGHT_CACHE=str(tmp / "preflight"))
    self.env.pop("MM1_GCLOUD", None)
    self.set_rules([])

  def set_rules(self, rules):
    self.rules.write_text(json.dumps(rules))
    Path(str(self.rules) + ".used").unlink(missing_ok=True)

  def run(self, script, *args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=REPO, env=self.env,
                          capture_output=True, text=True, timeout=timeout)

  def calls(self):
    return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def pod(tmp_path):
  return Pod(tmp_path)


def _kind(call):
  """A short name for a recorded gcloud call: 'create', 'describe', 'ssh:status', ..."""
  verb = call[3] if call[2] in ("queued-resources", "tpu-vm") else call[2]
  if verb == "ssh":
    command = next(a for a in call if a.startswith("--command="))
    for what in ("remote_setup.sh", "worker.py start", "worker.py status", "worker.py stop"):
      if what in command:
        return "ssh:" + what.split()[-1].replace("remote_setup.sh", "setup")
  return verb


SCRIPT_NAMES = ["create.py", "setup_workers.py", "launch.py", "watch.py", "stop.py", "delete.py", "supervise.py",
                "worker.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_every_script_has_usage_text(pod, script):
  proc = pod.run(script, "--help")
  assert proc.returncode == 0 and "usage:" in proc.stdout
  assert "--dry_run" in proc.stdout or script == "worker.py"
  assert not pod.calls()


@pytest.mark.slow
def test_dry_run_prints_the_exact_commands_in_order_and_runs_nothing(pod, tmp_path):
  gin = ["--gin_file=gin/experiments/quickstart.gin", "--gin.BATCH_SIZE=16"]
  proc = pod.run("supervise.py", *V5P_2X, "--capacity=spot", "--nfs=10.0.0.2:/mm1", "--run_name=r1",
                 "--allow_dirty", *gin, "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert not pod.calls(), "a dry run called gcloud"
  assert not list((tmp_path / "preflight").glob("*.json")), "a dry run compiled"
  lines = [shlex.split(ln.split("    # ")[0]) for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
  assert lines[0][1:4] == ["-m", "mm1_jax.aot", "--gin_file=gin/experiments/quickstart.gin"]
  assert "--topology=v5p-16" in lines[0] and "--num_slices=2" in lines[0] and "--gin.NUM_SLICES=2" in lines[0]
  assert lines[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "mm1-7b", "--project=my-project",
                      "--zone=us-east5-a", "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                      "--node-count=2", "--node-prefix=mm1-7b", "--spot"]
  assert lines[2][3:5] == ["queued-resources", "describe"]
  assert lines[3][:3] == ["git", "-C", str(REPO)] and lines[3][3] == "archive" and lines[3][-1] == SHA
  # Setup, then launch, node after node: mm1-7b-0 and mm1-7b-1, every worker of each.
  tarball = f"mm1_jax-{SHA[:12]}.tar.gz"
  assert [ln[4] for ln in lines[4:8]] == ["scp", "ssh", "scp", "ssh"]
  assert (lines[4][6], lines[5][5], lines[6][6], lines[7][5]) == (
      f"mm1-7b-0:{tarball}", "mm1-7b-0", f"mm1-7b-1:{tarball}", "mm1-7b-1")
  assert all("--worker=all" in ln for ln in lines[4:10])
  launches = [ln for ln in lines if "ssh" in ln and any("worker.py start" in a for a in ln)]
  assert [ln[5] for ln in launches[:2]] == ["mm1-7b-0", "mm1-7b-1"]
  for line in ("# every --poll_s:", "# when the capacity is preempted, suspended or failed:",
               "# when the run failed on a worker:"):
    assert line in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("create.py", ["--capacity=reserved", "--skip_preflight"]),
    ("setup_workers.py", ["--gcs_bucket=my-bucket"]),
    ("launch.py", ["--run_name=r1", "--gin_file=gin/experiments/quickstart.gin", "--allow_dirty"]),
    ("watch.py", ["--run_name=r1"]),
    ("stop.py", ["--run_name=r1"]),
    ("delete.py", ["--run_name=r1"]),
])
@pytest.mark.parametrize("pod_flags", [V5P_2X, V5E_VM], ids=["v5p-multislice", "v5e-vm"])
def test_every_command_has_a_dry_run(pod, script, extra, pod_flags):
  proc = pod.run(script, *pod_flags, *extra, "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert not pod.calls()
  gcloud_lines = [shlex.split(ln.split("    # ")[0]) for ln in proc.stdout.splitlines() if ln.startswith("gcloud ")]
  assert gcloud_lines
  nodes = ["mm1-7b-0", "mm1-7b-1"] if pod_flags is V5P_2X else ["mm1-small"]
  if script in ("setup_workers.py", "launch.py", "watch.py", "stop.py"):
    assert sorted({ln[5] for ln in gcloud_lines if ln[4] in ("ssh",)}) == nodes
  if script == "create.py" and pod_flags is V5E_VM:
    assert gcloud_lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mm1-small"]
    assert "--version=v2-alpha-tpuv5-lite" in gcloud_lines[0] and "--reserved" in gcloud_lines[0]
  if script == "delete.py":
    assert gcloud_lines[-1][4] == "delete" and "--quiet" in gcloud_lines[-1]


@pytest.mark.slow
def test_create_multislice_v5p_waits_until_active(pod):
  pod.set_rules([{"when": ["describe"], "stdout": "WAITING_FOR_RESOURCES\n"},
                 {"when": ["describe"], "stdout": "PROVISIONING\n"},
                 {"when": ["describe"], "stdout": "ACTIVE\n"}])
  proc = pod.run("create.py", *V5P_2X, "--capacity=spot", "--skip_preflight", "--poll_s=0")
  assert proc.returncode == 0, proc.stderr
  calls = pod.calls()
  assert [_kind(c) for c in calls] == ["create", "describe", "describe", "describe"]
  assert calls[0] == ["compute", "tpus", "queued-resources", "create", "mm1-7b", "--project=my-project",
                      "--zone=us-east5-a", "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                      "--node-count=2", "--node-prefix=mm1-7b", "--spot"]
  assert "4 workers" in proc.stdout


@pytest.mark.slow
@pytest.mark.libtpu
def test_create_v5e_vm_after_a_passing_preflight(pod, tmp_path):
  pod.set_rules([{"when": ["describe"], "stdout": "READY\n"}])
  proc = pod.run("create.py", *V5E_VM, "--capacity=spot", "--gin_file=gin/experiments/quickstart.gin",
                 "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32", "--poll_s=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "preflight: fits" in proc.stderr
  (report,) = [json.loads(p.read_text()) for p in (tmp_path / "preflight").glob("*.json")]
  assert report["fits"] and report["topology"] == "v5litepod-4" and report["hbm_bytes"] == 16 * 2**30
  calls = pod.calls()
  assert calls[0] == ["compute", "tpus", "tpu-vm", "create", "mm1-small", "--project=my-project",
                      "--zone=us-west4-a", "--accelerator-type=v5litepod-4", "--version=v2-alpha-tpuv5-lite",
                      "--spot"]
  assert [_kind(c) for c in calls] == ["create", "describe"]
  # The same flags again: the verdict is reused, not compiled twice.
  proc = pod.run("create.py", *V5E_VM, "--capacity=spot", "--gin_file=gin/experiments/quickstart.gin",
                 "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32", "--poll_s=0", "--no_wait")
  assert proc.returncode == 0 and "reusing the verdict" in proc.stderr


@pytest.mark.slow
@pytest.mark.libtpu
def test_preflight_gate_refuses_a_step_that_does_not_fit(pod):
  proc = pod.run("launch.py", "--name=tiny", "--project=my-project", "--zone=us-west4-a",
                 "--accelerator_type=v5litepod-1", "--mode=vm", "--run_name=big", "--allow_dirty",
                 "--gin_file=gin/experiments/quickstart.gin", "--gin.BATCH_SIZE=512", "--gin.SEQ_LEN=4096")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "does not fit" in proc.stderr and "GiB a chip on v5litepod-1" in proc.stderr
  assert "--skip_preflight" in proc.stderr
  assert pod.calls() == [], "nothing may be created or launched after a refusal"
  # Told otherwise, it goes ahead.
  proc = pod.run("launch.py", "--name=tiny", "--project=my-project", "--zone=us-west4-a",
                 "--accelerator_type=v5litepod-1", "--mode=vm", "--run_name=big", "--allow_dirty",
                 "--gin_file=gin/experiments/quickstart.gin", "--gin.BATCH_SIZE=512", "--gin.SEQ_LEN=4096",
                 "--skip_preflight")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "preflight: skipped" in proc.stderr and [_kind(c) for c in pod.calls()] == ["ssh:start"]


@pytest.mark.slow
def test_setup_copies_the_commit_to_every_slice(pod):
  proc = pod.run("setup_workers.py", *V5P_2X, "--nfs=10.0.0.2:/mm1 share")
  assert proc.returncode == 0, proc.stderr
  calls = pod.calls()
  assert sorted(_kind(c) for c in calls) == ["scp", "scp", "ssh:setup", "ssh:setup"]
  for node in ("mm1-7b-0", "mm1-7b-1"):
    mine = [c for c in calls if node in c or f"{node}:mm1_jax-{SHA[:12]}.tar.gz" in c]
    assert [_kind(c) for c in mine] == ["scp", "ssh:setup"]  # copied before it is unpacked
    local = mine[0][4]
    assert subprocess.run(["tar", "-tzf", local], capture_output=True, text=True).stdout.count(
        f"mm1_jax-{SHA[:12]}/tpu_scripts/remote_setup.sh") == 1
    command = next(a for a in mine[1] if a.startswith("--command=")).split("=", 1)[1]
    words = shlex.split(command)
    assert words[words.index("--nfs") + 1] == "10.0.0.2:/mm1 share"  # one word, as given
  assert subprocess.run(["bash", "-n", str(SCRIPTS / "remote_setup.sh")]).returncode == 0
  usage = subprocess.run(["bash", str(SCRIPTS / "remote_setup.sh"), "--help"], capture_output=True, text=True)
  assert usage.returncode == 0 and "--nfs" in usage.stdout


def _fake_workers(pod, tmp_path, nodes, workers_per_node):
  """Home folders for each node, holding the commit's folder as setup_workers.py leaves it; the
  venv's mm1-train is a stand-in that records its arguments and environment."""
  stub_out = tmp_path / "stub_out"
  stub_out.mkdir()
  for node in nodes:
    code = tmp_path / "homes" / node / "mm1_jax" / SHA[:12]
    (code / ".venv" / "bin").mkdir(parents=True)
    (code / "tpu_scripts").symlink_to(SCRIPTS)
    (code / ".venv" / "bin" / "python").symlink_to(sys.executable)
    stub = code / ".venv" / "bin" / "mm1-train"
    stub.write_text(f"#!{sys.executable}\n" + (
        "import json, os, sys, time, uuid\n"
        "keys = ('MM1_NOTE', 'MM1_DISTRIBUTED', 'MM1_WORKER_ID', 'MEGASCALE_SLICE_ID')\n"
        "out = {'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {k: os.environ.get(k) for k in keys}}\n"
        "path = os.path.join(os.environ['STUB_OUT'], uuid.uuid4().hex + '.json')\n"
        "open(path, 'w').write(json.dumps(out))\n"
        "print('step 1 loss 9.9', flush=True)\n"
        "time.sleep(float(os.environ.get('STUB_SLEEP', '0')))\n"))
    stub.chmod(0o755)
  pod.env.update(FAKE_GCLOUD_EXEC_HOME=str(tmp_path / "homes"), FAKE_GCLOUD_WORKERS=str(workers_per_node),
                 STUB_OUT=str(stub_out))
  return stub_out



@pytest.mark.slow
def test_mm1_pod_init_flags_reach_the_preflight_and_every_worker(pod):
  """An MM1 pod's pre-trained parts (INIT_ENCODER, INIT_DECODER: its train.init_from) given
  as --gin flags go both to the gate's mm1-aot, which parses the same pod, and to mm1-train
  on every worker of every slice."""
  init = ["--gin.INIT_ENCODER='/mnt/mm1/pretrained/clip_vit_h14_378:encoder'",
          "--gin.INIT_DECODER='/mnt/mm1/runs/llm-3b/checkpoints:decoder'"]
  proc = pod.run("launch.py", *V5P_2X, "--run_name=r1", "--gin_file=gin/pods/mm1_3b_v5p-128.gin", *init,
                 "--allow_dirty", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  lines = [shlex.split(ln.split("    # ")[0]) for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
  gate = lines[0]
  assert "--gin_file=gin/pods/mm1_3b_v5p-128.gin" in gate and "--no_cost" in gate
  assert [f for f in gate if f.startswith("--gin.INIT_")] == init
  starts = [ln for ln in lines if any("worker.py start" in a for a in ln)]
  assert len(starts) == 2  # one ssh per slice, every worker of it
  for ln in starts:
    (remote,) = [a[len("--command="):] for a in ln if a.startswith("--command=")]
    train_argv = shlex.split(remote)
    train_argv = train_argv[train_argv.index(".venv/bin/mm1-train"):]
    assert [f for f in train_argv if f.startswith("--gin.INIT_")] == init

@pytest.mark.slow
def test_launch_passes_values_with_spaces_and_quotes_intact_to_every_worker(pod, tmp_path):
  stub_out = _fake_workers(pod, tmp_path, ["mm1-7b-0", "mm1-7b-1"], 2)
  workdir = tmp_path / "shared" / "runs" / "my run; rm -rf ~"
  note = "it's a \"quoted\" value with $HOME and `backticks`"
  gin_value = "\"'mm1 shapes' && echo pwned\""
  proc = pod.run("launch.py", *V5P_2X, "--run_name=r-1", "--gin_file=gin/experiments/quickstart.gin",
                 f"--gin.MIXTURE_OR_TASK_NAME={gin_value}", f"--workdir={workdir}", f"--env=MM1_NOTE={note}",
                 "--train_flag=--stop_after_steps=5", "--allow_dirty", "--skip_preflight")
  assert proc.returncode == 0, proc.stderr
  assert [_kind(c) for c in pod.calls()] == ["ssh:start", "ssh:start"]
  records = [json.loads(p.read_text()) for p in sorted(stub_out.glob("*.json"))]
  for _ in range(100):  # the stand-ins start detached
    if len(records) == 4:
      break
    import time
    time.sleep(0.1)
    records = [json.loads(p.read_text()) for p in sorted(stub_out.glob("*.json"))]
  assert len(records) == 4  # 2 slices x 2 workers
  expected = ["--gin_file=gin/experiments/quickstart.gin", f"--gin.MIXTURE_OR_TASK_NAME={gin_value}",
              "--gin.NUM_SLICES=2", f"--workdir={workdir}", "--stop_after_steps=5"]
  for r in records:
    assert r["argv"] == expected
    assert r["env"]["MM1_NOTE"] == note and r["env"]["MM1_DISTRIBUTED"] == "tpu"
    assert Path(r["cwd"]).name == SHA[:12]
  assert sorted(r["env"]["MM1_WORKER_ID"] for r in records) == ["0", "0", "1", "1"]
  logs = sorted(p.name for p in (workdir / "logs").glob("*.log"))
  assert logs == ["slice0-worker0.log", "slice0-worker1.log", "slice1-worker0.log", "slice1-worker1.log"]
  assert not (tmp_path / "pwned").exists()

  # watch: every worker answers; all finished with exit code 0.
  for _ in range(100):
    proc = pod.run("watch.py", *V5P_2X, "--run_name=r-1", "--json", "--lines=2")
    status = json.loads(proc.stdout.splitlines()[-1])
    if status["by_state"].get("exited") == 4:
      break
  assert proc.returncode == 0, proc.stderr
  assert status["answered"] == 4 and status["exit_codes"] == [0]
  assert {(w["slice"], w["worker"]) for w in status["workers"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
  assert any("step 1 loss 9.9" in line for line in status["log_tail"])


@pytest.mark.slow
def test_watch_and_stop_a_running_run(pod, tmp_path):
  _fake_workers(pod, tmp_path, ["mm1-small"], 1)
  pod.env["STUB_SLEEP"] = "60"
  proc = pod.run("launch.py", *V5E_VM, "--run_name=r2", "--gin_file=gin/experiments/quickstart.gin",
                 f"--workdir={tmp_path / 'shared' / 'r2'}", "--allow_dirty", "--skip_preflight")
  assert proc.returncode == 0, proc.stderr
  proc = pod.run("watch.py", *V5E_VM, "--run_name=r2")
  assert proc.returncode == 0 and "1/1 workers running" in proc.stdout, proc.stdout + proc.stderr
  assert "goodput" not in proc.stdout  # no ledger yet
  # The run's goodput ledger, as mm1-train's process 0 keeps it in the workdir: watch shows it.
  from mm1_jax import goodput
  summary = goodput.summarize([{"started": 0.0, "updated": 100.0, "lost_steps": 3,
                                "buckets": {"productive": 60.0, "startup": 30.0}}])
  (tmp_path / "shared" / "r2" / "goodput.json").write_text(json.dumps({"summary": summary, "attempts": []}))
  proc = pod.run("watch.py", *V5E_VM, "--run_name=r2")
  assert "  goodput 60.0 % of 100 s over 1 attempt (badput: startup 30.0 %, other 10.0 %); 3 steps redone, " \
         "as of " in proc.stdout, proc.stdout
  proc = pod.run("watch.py", *V5E_VM, "--run_name=r2", "--json")
  assert json.loads(proc.stdout.splitlines()[-1])["goodput"]["goodput"] == pytest.approx(0.6)
  # A second launch of a running run is refused by the worker, not started twice.
  proc = pod.run("launch.py", *V5E_VM, "--run_name=r2", "--gin_file=gin/experiments/quickstart.gin",
                 f"--workdir={tmp_path / 'shared' / 'r2'}", "--allow_dirty", "--skip_preflight")
  assert proc.returncode == 1 and "already running" in proc.stderr
  proc = pod.run("stop.py", *V5E_VM, "--run_name=r2", "--grace_s=30")
  assert proc.returncode == 0, proc.stderr
  assert "'exited': 1" in proc.stdout  # the stand-in does not trap SIGTERM: 128 + 15
  proc = pod.run("watch.py", *V5E_VM, "--run_name=r2", "--json")
  status = json.loads(proc.stdout.splitlines()[-1])
  assert proc.returncode == 1 and status["exit_codes"] == [143]
  # A run never started on this pod: every worker says so.
  proc = pod.run("watch.py", *V5E_VM, "--run_name=nothing", "--json")
  assert json.loads(proc.stdout.splitlines()[-1])["by_state"] == {"not started": 1}


def _status_lines(state, code=None, slices=2, workers=2):
  return "".join("MM1_WORKER " + json.dumps({"slice": s, "worker": w, "state": state, "exit_code": code,
                                             "log_age_s": 1.0, "last_line": "step"}) + "\n"
                 for s in range(slices) for w in range(workers))


@pytest.mark.slow
def test_supervise_recreates_preempted_capacity_and_relaunches(pod):
  one_slice = _status_lines("running", slices=1)
  pod.set_rules([
      {"when": ["describe"], "stdout": "ACTIVE\n"},
      {"when": ["worker.py status"], "stdout": one_slice, "times": 2},
      {"when": ["describe"], "stdout": "SUSPENDED\n"},  # spot capacity preempted
      {"when": ["describe"], "rc": 1, "stderr": "ERROR: NOT_FOUND: queued resource mm1-7b was not found\n"},
      {"when": ["describe"], "stdout": "ACTIVE\n", "times": 2},
      {"when": ["worker.py status"], "stdout": _status_lines("exited", 0, slices=1), "times": 2},
  ])
  proc = pod.run("supervise.py", *V5P_2X, "--capacity=spot", "--run_name=r3",
                 "--gin_file=gin/experiments/quickstart.gin", "--skip_preflight", "--allow_dirty", "--poll_s=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  kinds = [_kind(c) for c in pod.calls()]
  assert kinds[:7] == ["describe", "ssh:status", "ssh:status", "describe", "delete", "describe", "create"]
  assert kinds[7] == "describe"  # until ACTIVE
  assert sorted(kinds[8:14]) == ["scp", "scp", "ssh:setup", "ssh:setup", "ssh:start", "ssh:start"]
  assert kinds[14:] == ["describe", "ssh:status", "ssh:status"]
  assert "restart 1/20: mm1-7b is SUSPENDED" in proc.stderr
  assert "finished on all 4 workers" in proc.stderr
  # The relaunch is launch.py's command to the letter: the same workdir, so mm1-train resumes.
  relaunched = sorted(c for c in pod.calls() if _kind(c) == "ssh:start")
  dry = pod.run("launch.py", *V5P_2X, "--run_name=r3", "--gin_file=gin/experiments/quickstart.gin", "--skip_preflight",
                "--allow_dirty", "--dry_run")
  planned = sorted(shlex.split(ln)[1:] for ln in dry.stdout.splitlines() if "worker.py start" in ln)
  assert relaunched == planned and len(planned) == 2


@pytest.mark.slow
def test_supervise_relaunches_a_crashed_run_but_not_a_config_error(pod):
  mixed = _status_lines("running", slices=1, workers=1) + "MM1_WORKER " + json.dumps(
      {"slice": 0, "worker": 1, "state": "lost", "exit_code": None}) + "\n"
  pod.set_rules([
      {"when": ["describe"], "stdout": "ACTIVE\n", "times": None},
      {"when": ["worker.py status", "mm1-7b-0"], "stdout": mixed},
      {"when": ["worker.py status", "mm1-7b-1"], "stdout": _status_lines("running", slices=1)},
      {"when": ["worker.py status"], "stdout": _status_lines("exited", 2, slices=1), "times": 2},
  ])
  proc = pod.run("supervise.py", *V5P_2X, "--run_name=r4", "--gin_file=gin/experiments/quickstart.gin",
                 "--skip_preflight", "--allow_dirty", "--poll_s=0")
  assert proc.returncode == 2, proc.stderr[-3000:]
  kinds = [_kind(c) for c in pod.calls()]
  assert kinds[:3] == ["describe", "ssh:status", "ssh:status"]
  # A lost worker: stop the rest, set up (a replaced VM needs it), launch again.
  assert sorted(kinds[3:11]) == sorted(["ssh:stop"] * 2 + ["scp", "ssh:setup"] * 2 + ["ssh:start"] * 2)
  assert kinds[11:] == ["describe", "ssh:status", "ssh:status", "ssh:stop", "ssh:stop"]
  assert "restart 1/20" in proc.stderr and "exited 2 (bad config)" in proc.stderr


@pytest.mark.slow
def test_supervise_relaunches_a_hung_run_and_logs_its_goodput(pod):
  """mm1-train's hang watchdog exits 75 on every worker: a restart, not a stop."""
  import time
  summary = {"goodput": 0.5, "badput": {"lost": 0.3, "downtime": 0.2}, "wall_s": 7200.0, "attempts": 2,
             "lost_steps": 40, "hangs": 1, "step": 900, "updated": time.time()}
  done = "".join(ln[:-2] + f', "goodput": {json.dumps(summary)}}}\n'
                 for ln in _status_lines("exited", 0, slices=1).splitlines(keepends=True))
  pod.set_rules([
      {"when": ["describe"], "stdout": "ACTIVE\n", "times": None},
      {"when": ["worker.py status"], "stdout": _status_lines("exited", 75, slices=1), "times": 2},
      {"when": ["worker.py status"], "stdout": done, "times": 2},
  ])
  proc = pod.run("supervise.py", *V5P_2X, "--run_name=r7", "--gin_file=gin/experiments/quickstart.gin",
                 "--skip_preflight", "--allow_dirty", "--poll_s=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  kinds = [_kind(c) for c in pod.calls()]
  assert kinds[:3] == ["describe", "ssh:status", "ssh:status"]
  assert sorted(kinds[3:11]) == sorted(["ssh:stop"] * 2 + ["scp", "ssh:setup"] * 2 + ["ssh:start"] * 2)
  assert kinds[11:] == ["describe", "ssh:status", "ssh:status"]
  assert "restart 1/20: hang: 4 worker(s) exited 75" in proc.stderr
  assert "goodput 50.0 % of 2.00 h over 2 attempts (badput: lost 30.0 %, downtime 20.0 %); 40 steps " \
         "redone; 1 hang, as of " in proc.stderr


@pytest.mark.slow
def test_supervise_rides_out_a_failed_gcloud_call_and_silent_workers(pod):
  pod.set_rules([
      {"when": ["describe"], "rc": 1, "stderr": "ERROR: (gcloud.compute.tpus) connection reset\n"},
      {"when": ["describe"], "stdout": "ACTIVE\n", "times": 2},
      {"when": ["worker.py status"], "stdout": "", "times": 2},  # ssh answered nothing
      {"when": ["worker.py status"], "stdout": _status_lines("exited", 0, slices=1), "times": 2},
  ])
  proc = pod.run("supervise.py", *V5P_2X, "--run_name=r6", "--gin_file=gin/experiments/quickstart.gin",
                 "--skip_preflight", "--allow_dirty", "--poll_s=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  kinds = [_kind(c) for c in pod.calls()]
  assert kinds == ["describe", "describe", "ssh:status", "ssh:status", "describe", "ssh:status", "ssh:status"]
  assert "connection reset" in proc.stderr and "0 of 4 workers answered" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--name=My Pod"], "--name='My Pod' is not a valid value"),
    (["--accelerator_type=v5p-7"], "--accelerator_type"),
    (["--num_slices=2", "--mode=vm"], "several slices need queued resources"),
    (["--gin.NUM_SLICES=3"], "disagrees with --num_slices=1"),
    (["--gin_file=/etc/passwd"], "not in commit"),
    (["--run_name=a b"], "--run_name='a b'"),
    (["--env=NOEQUALS"], "expected KEY=VALUE"),
    (["--workdir=relative/path"], "must be an absolute path"),
])
def test_bad_values_are_refused_before_anything_runs(pod, flags, message):
  base = {"--name": "mm1-x", "--project": "my-project", "--zone": "us-east5-a", "--accelerator_type": "v5p-8",
          "--run_name": "ok", "--gin_file": "gin/experiments/quickstart.gin"}
  for flag in flags:
    base.pop(flag.split("=", 1)[0], None)
  args = [f"{k}={v}" for k, v in base.items()] + flags + ["--allow_dirty", "--skip_preflight"]
  proc = pod.run("launch.py", *args)
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert pod.calls() == []


@pytest.mark.slow
def test_delete_asks_for_yes_and_stops_the_run_first(pod):
  proc = pod.run("delete.py", *V5P_2X)
  assert proc.returncode == 2 and "pass --yes" in proc.stderr and pod.calls() == []
  pod.set_rules([{"when": ["worker.py stop"], "stdout": _status_lines("exited", 143, slices=1), "times": 2}])
  proc = pod.run("delete.py", *V5P_2X, "--run_name=r5", "--yes")
  assert proc.returncode == 0, proc.stderr
  calls = pod.calls()
  assert [_kind(c) for c in calls] == ["ssh:stop", "ssh:stop", "delete"]
  assert calls[-1] == ["compute", "tpus", "queued-resources", "delete", "mm1-7b", "--project=my-project",
                       "--zone=us-east5-a", "--force", "--quiet"]


@pytest.mark.slow
@pytest.mark.libtpu
def test_launch_refuses_a_working_tree_that_differs_from_the_commit(tmp_path):
  clone = tmp_path / "clone"
  subprocess.run(["git", "clone", "--quiet", "--shared", str(REPO), str(clone)], check=True)
  with (clone / "gin" / "experiments" / "quickstart.gin").open("a") as f:
    f.write("\n# changed\n")
  p = Pod(tmp_path)
  proc = subprocess.run([sys.executable, str(clone / "tpu_scripts" / "launch.py"), "--name=mm1-x",
                         "--project=my-project", "--zone=us-east5-a", "--accelerator_type=v5p-8", "--run_name=r",
                         "--gin_file=gin/experiments/quickstart.gin"], cwd=clone, env=p.env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "working tree differs" in proc.stderr and "--allow_dirty" in proc.stderr
  assert p.calls() == []


def test_mm1_distributed_marks_a_multi_host_tpu_run(monkeypatch):
  from mm1_jax import distributed

  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("MM1_DISTRIBUTED", raising=False)
  assert not distributed.on_multihost_tpu()
  monkeypatch.setenv("MM1_DISTRIBUTED", "tpu")
  assert distributed.on_multihost_tpu()


def _trainer_pids(marker: str) -> list[int]:
  """mm1-train processes (not worker.py's wrapper) whose command line names `marker`."""
  pids = []
  for proc in Path("/proc").iterdir():
    try:
      cmd = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
      continue
    if any(marker.encode() in c for c in cmd) and any(c.endswith(b"mm1-train") for c in cmd[:2]) \
        and not any(c.endswith(b"worker.py") for c in cmd):
      pids.append(int(proc.name))
  return pids


@pytest.mark.slow
def test_supervise_resumes_a_killed_training_run(pod, tmp_path):
  """The real mm1-train on one (fake) worker: killed after a checkpoint, relaunched, finished."""
  import shutil
  import signal
  import time

  code = tmp_path / "homes" / "mm1-small" / "mm1_jax" / SHA[:12]
  (code / ".venv" / "bin").mkdir(parents=True)
  for name in ("tpu_scripts", "gin"):
    (code / name).symlink_to(REPO / name)
  (code / ".venv" / "bin" / "python").symlink_to(sys.executable)
  (code / ".venv" / "bin" / "mm1-train").symlink_to(shutil.which("mm1-train"))
  pod.env.update(FAKE_GCLOUD_EXEC_HOME=str(tmp_path / "homes"), JAX_PLATFORMS="cpu")
  pod.env.pop("XLA_FLAGS", None)
  pod.set_rules([{"when": ["describe"], "stdout": "READY\n", "times": None},
                 {"when": ["remote_setup.sh"], "stdout": "MM1_SETUP done\n", "times": None}])
  workdir = tmp_path / "shared" / "runs" / "e2e"
  sup = subprocess.Popen(
      [sys.executable, str(SCRIPTS / "supervise.py"), *V5E_VM, "--run_name=e2e",
       "--gin_file=gin/experiments/quickstart.gin", "--gin.TRAIN_STEPS=20", "--gin.CHECKPOINT_EVERY=5", "--gin.BATCH_SIZE=4", "--gin.LOG_EVERY=1",
       "--gin.EVALUATION=None", f"--workdir={workdir}", "--skip_preflight", "--allow_dirty", "--poll_s=2"],
      cwd=REPO, env=pod.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  killed, deadline = [], time.time() + 400
  try:
    while sup.poll() is None and time.time() < deadline:
      if not killed and (workdir / "checkpoints" / "10").is_dir():
        killed = _trainer_pids(str(workdir))
        for pid in killed:
          os.kill(pid, signal.SIGKILL)
      time.sleep(0.2)
  finally:
    if sup.poll() is None:
      sup.kill()
  out, err = sup.communicate()
  assert killed and sup.returncode == 0, err[-3000:]
  assert "restart 1/20" in err and "exit codes [137]" in err
  log = (workdir / "logs" / "slice0-worker0.log").read_text()
  assert log.count("=== ") >= 3  # start, exit 137 ... start again, exit 0
  assert f"resumed from {workdir}/checkpoints/" in log and log.rstrip().endswith("exit code 0")
  assert (workdir / "checkpoints" / "20").is_dir()


# ---------------------------------------------------------------------------- a run folder in a bucket
