"""tpu_scripts with the run folder in a Cloud Storage bucket (--bucket): the URL checks, the
worker command lines, setup without mounts, and (against the storage emulator) log uploads
and watch reading the bucket."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from test_tpu_scripts import SCRIPTS, V5E_VM, V5P_2X, Pod, _fake_workers


@pytest.fixture
def pod(tmp_path):
  return Pod(tmp_path)


def _pod_module():
  """tpu_scripts/_pod.py, imported as the scripts import it."""
  if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
  import _pod

  return _pod


@pytest.mark.parametrize("value, expected", [
    ("gs://my-bucket", "gs://my-bucket"),
    ("gs://my-bucket/", "gs://my-bucket"),
    ("gs://my_bucket-2/mm1/pods/", "gs://my_bucket-2/mm1/pods"),
    ("gs://abc", "gs://abc"),
    ("gs://" + "a" * 63 + "/x", "gs://" + "a" * 63 + "/x"),
    ("gs://runs.example.com/a=1/b", "gs://runs.example.com/a=1/b"),
])
def test_valid_bucket_urls_are_kept(value, expected):
  assert _pod_module().parse_bucket_url(value) == expected


@pytest.mark.parametrize("value, why", [
    ("my-bucket", "expected a Cloud Storage URL"),
    ("s3://my-bucket", "expected a Cloud Storage URL"),
    ("gs://", "3 to 63 characters"),
    ("gs://ab", "3 to 63 characters"),
    ("gs://" + "a" * 64, "3 to 63 characters"),
    ("gs://My-Bucket", "lower-case letters"),
    ("gs://my bucket", "lower-case letters"),
    ("gs://-bucket", "starts and ends with a letter or digit"),
    ("gs://bucket_", "starts and ends with a letter or digit"),
    ("gs://a..b", "each dot-separated part"),
    ("gs://a-.b", "each dot-separated part"),
    ("gs://192.168.1.20", "IP address"),
    ("gs://goog-runs", "'goog'"),
    ("gs://my-g00gle-runs", "'google'"),
    ("gs://my-bucket//runs", "not ''"),
    ("gs://my-bucket/../runs", "not '..'"),
    ("gs://my-bucket/my runs", "not 'my runs'"),
    ("gs://my-bucket/runs*", "not 'runs*'"),
])
def test_bad_bucket_urls_are_refused_with_the_rule_they_break(value, why):
  _pod = _pod_module()
  with pytest.raises(_pod.UsageError) as e:
    _pod.parse_bucket_url(value)
  assert why in str(e.value) and repr(value) in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, message", [
    ("launch.py", ["--bucket=my-bucket", "--run_name=r", "--gin_file=gin/experiments/quickstart.gin",
                   "--allow_dirty", "--skip_preflight"], "--bucket='my-bucket': expected a Cloud Storage URL"),
    ("launch.py", ["--workdir=gs://goog-x/runs/r", "--run_name=r", "--gin_file=gin/experiments/quickstart.gin",
                   "--allow_dirty", "--skip_preflight"], "--workdir='gs://goog-x/runs/r'"),
    ("supervise.py", ["--bucket=gs://My-Bucket", "--run_name=r", "--gin_file=gin/experiments/quickstart.gin",
                      "--allow_dirty", "--skip_preflight"], "lower-case letters"),
    ("setup_workers.py", ["--bucket=gs://ab"], "3 to 63 characters"),
    ("setup_workers.py", ["--gcs_bucket=gs://my-bucket"], "pass --bucket=gs://my-bucket"),
    ("watch.py", ["--bucket=gs://my-bucket//x", "--run_name=r"], "not ''"),
    ("stop.py", ["--bucket=gs://192.168.0.1", "--run_name=r"], "IP address"),
])
def test_bad_bucket_values_are_refused_before_anything_runs(pod, script, flags, message):
  proc = pod.run(script, *V5E_VM, *flags)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert pod.calls() == []


def _remote_args(line):
  """The words of the command a dry-run ssh line runs on the workers."""
  (remote,) = [a[len("--command="):] for a in line if a.startswith("--command=")]
  return shlex.split(remote)


@pytest.mark.slow
def test_bucket_is_the_workdir_on_every_worker_and_nothing_is_mounted(pod):
  gin = ["--run_name=r1", "--gin_file=gin/experiments/quickstart.gin", "--allow_dirty", "--skip_preflight"]
  proc = pod.run("supervise.py", *V5P_2X, "--bucket=gs://my-bucket/mm1/", *gin, "--log_upload_s=60", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert not pod.calls()
  lines = [shlex.split(ln.split("    # ")[0]) for ln in proc.stdout.splitlines() if ln.startswith("gcloud ")]
  starts = [_remote_args(ln) for ln in lines if "ssh" in ln and any("worker.py start" in a for a in ln)]
  setups = [_remote_args(ln) for ln in lines if "ssh" in ln and any("remote_setup.sh" in a for a in ln)]
  assert len(starts) == 6 and len(setups) == 6  # from nothing, after a preemption, after a crash; 2 slices
  for words in starts:
    assert words[words.index("--workdir") + 1] == "gs://my-bucket/mm1/runs/r1"  # the worker's own record
    assert words[words.index("--log_upload_s") + 1] == "60"
    train = words[words.index(".venv/bin/mm1-train"):]
    assert [w for w in train if w.startswith("--workdir")] == ["--workdir=gs://my-bucket/mm1/runs/r1"]
  for words in setups:
    assert words[words.index("--bucket") + 1] == "gs://my-bucket/mm1"
    assert "--nfs" not in words and "--gcs_bucket" not in words
  # setup_workers.py on its own says the same; with --nfs as well, the mount comes back.
  proc = pod.run("setup_workers.py", *V5E_VM, "--bucket=gs://my-bucket/mm1", "--dry_run")
  (setup,) = [_remote_args(shlex.split(ln)) for ln in proc.stdout.splitlines() if "remote_setup.sh" in ln]
  assert setup[setup.index("--bucket") + 1] == "gs://my-bucket/mm1" and "--nfs" not in setup
  proc = pod.run("setup_workers.py", *V5E_VM, "--bucket=gs://my-bucket/mm1", "--nfs=10.0.0.2:/data", "--dry_run")
  (setup,) = [_remote_args(shlex.split(ln)) for ln in proc.stdout.splitlines() if "remote_setup.sh" in ln]
  assert setup[setup.index("--nfs") + 1] == "10.0.0.2:/data"
  # A mounted workdir gets no upload interval: its log is written in place.
  proc = pod.run("launch.py", *V5E_VM, *gin, "--dry_run")
  (start,) = [_remote_args(shlex.split(ln)) for ln in proc.stdout.splitlines() if "worker.py start" in ln]
  assert start[start.index("--workdir") + 1] == "/mnt/mm1/runs/r1" and "--log_upload_s" not in start


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("create.py", ["--skip_preflight", "--no_wait"]),
    ("setup_workers.py", []),
    ("launch.py", ["--run_name=r", "--gin_file=gin/experiments/quickstart.gin", "--allow_dirty", "--skip_preflight"]),
    ("watch.py", ["--run_name=r"]),
    ("stop.py", ["--run_name=r"]),
    ("delete.py", ["--run_name=r"]),
])
def test_the_example_pod_flags_with_their_bucket_suit_every_command(pod, script, extra):
  """The example flag file carries --bucket, so every command must take it."""
  proc = pod.run(script, f"@{SCRIPTS / 'example_pod.flags'}", *extra, "--dry_run")
  assert proc.returncode == 0, proc.stderr
  if script == "launch.py":
    starts = [_remote_args(shlex.split(ln)) for ln in proc.stdout.splitlines() if "worker.py start" in ln]
    assert len(starts) == 2 and all(w[w.index("--workdir") + 1] == "gs://my-bucket/mm1/runs/r" for w in starts)


@pytest.mark.slow
def test_remote_setup_with_a_bucket_mounts_nothing_and_checks_access(tmp_path):
  """remote_setup.sh as a worker runs it, on an installed commit: with --bucket no mount,
  sudo or package install runs, and the access check runs (and fails the setup when the
  place cannot be written)."""
  code = tmp_path / "code"
  (code / ".venv" / "bin").mkdir(parents=True)
  (code / "tpu_scripts").symlink_to(SCRIPTS)
  (code / ".venv" / "bin" / "python").symlink_to(sys.executable)
  (code / ".venv" / "bin" / "mm1-train").write_text("#!/bin/sh\n")
  (code / ".venv" / "bin" / "mm1-train").chmod(0o755)
  (code / ".venv" / ".mm1_installed").touch()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("sudo", "mount", "mountpoint", "gcsfuse", "apt-get", "curl"):
    (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path / 'tools.log'}\nexit 1\n")
    (bin_dir / tool).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path))
  script = str(code / "tpu_scripts" / "remote_setup.sh")
  bucket = tmp_path / "bucket" / "mm1"  # a local folder stands in for the bucket
  proc = subprocess.run(["bash", script, "--bucket", str(bucket)], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "already installed" in proc.stdout and f"can write to {bucket}" in proc.stdout
  assert not (tmp_path / "tools.log").exists(), (tmp_path / "tools.log").read_text()
  assert bucket.is_dir() and not list(bucket.iterdir())  # the probe object was deleted
  blocked = tmp_path / "ro"
  blocked.write_text("a file, not a folder")
  proc = subprocess.run(["bash", script, "--bucket", str(blocked / "mm1")], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1 and "cannot write to" in proc.stderr and "storage.objectUser" in proc.stderr


def test_run_folder_is_read_through_epath_from_a_local_folder(tmp_path):
  """The reader watch, stop and supervise use for a bucket workdir, on a local folder: the
  last complete metrics record of a file longer than the tail it reads, the ledger's
  summary, nothing (and no error) for a folder not written yet, an error for a bad ledger."""
  _pod = _pod_module()
  from mm1_jax import goodput

  empty = _pod.read_run_folder(str(tmp_path / "not-yet"))
  assert (empty["goodput"], empty["metrics"], empty["errors"]) == (None, None, [])
  run = tmp_path / "run"
  run.mkdir()
  records = [json.dumps({"step": i, "time": 1.0, "loss": 10.0 / (i + 1), "pad": "x" * 40}) for i in range(5000)]
  (run / "metrics.jsonl").write_text("\n".join(records) + "\n" + '{"step": 5000, "loss": 0.0')  # cut mid-record
  summary = goodput.summarize([{"started": 0.0, "updated": 100.0, "buckets": {"productive": 80.0}}])
  (run / "goodput.json").write_text(json.dumps({"summary": summary, "attempts": []}))
  folder = _pod.read_run_folder(str(run))
  assert folder["errors"] == []
  assert folder["metrics"]["step"] == 4999 and folder["metrics"]["loss"] == pytest.approx(10.0 / 5000)
  assert folder["goodput"]["goodput"] == pytest.approx(0.8)
  assert _pod.metrics_line(folder["metrics"]).startswith("step 4999: loss 0.002, as of ")
  (run / "goodput.json").write_text("{not json")
  folder = _pod.read_run_folder(str(run))
  assert folder["goodput"] is None and folder["errors"][0].startswith("goodput.json: JSONDecodeError")
  assert folder["metrics"]["step"] == 4999


EMULATED_BUCKET = "mm1-pods"


@pytest.fixture
def emulator():
  """A Cloud Storage emulator on 127.0.0.1 (tests/helpers/gcs_emulator.py); yields its URL."""
  from helpers import gcs_emulator

  with gcs_emulator.running(EMULATED_BUCKET) as url:
    yield url


def _objects(emulator, prefix):
  """{name: bytes} of the objects under `prefix`, as the emulator's JSON API has them."""
  from helpers import gcs_emulator

  return {name: gcs_emulator.object_bytes(emulator, EMULATED_BUCKET, name)
          for name in gcs_emulator.object_names(emulator, EMULATED_BUCKET, prefix)}


@pytest.mark.slow
def test_a_run_in_a_bucket_uploads_each_attempts_log_and_watch_reads_the_bucket(pod, tmp_path, emulator,
                                                                                  monkeypatch):
  """launch --bucket on a fake worker, with the Cloud Storage emulator as the bucket: the worker
  keeps its log on its disk and uploads each start's part to an object of its own (during the
  run and at its end); watch and stop read the bucket's metrics and goodput ledger from this
  machine; the worker's access check passes for the bucket and fails for a missing one."""
  import time

  from mm1_jax import goodput, paths

  for env in (pod.env, None):
    for key, value in (("STORAGE_EMULATOR_HOST", emulator), ("EPATH_USE_TF", "false")):
      if env is None:
        monkeypatch.setenv(key, value)
      else:
        env[key] = value
  stub_out = _fake_workers(pod, tmp_path, ["mm1-small"], 1)
  bucket = f"gs://{EMULATED_BUCKET}/pods"
  workdir = f"{bucket}/runs/rb"
  logs_prefix = "pods/runs/rb/logs/slice0-worker0/"

  probe = subprocess.run([sys.executable, str(SCRIPTS / "worker.py"), "probe", "--workdir", bucket], env=pod.env,
                         capture_output=True, text=True, timeout=120)
  assert probe.returncode == 0 and f"can write to {bucket}" in probe.stdout, probe.stderr[-2000:]
  assert _objects(emulator, "pods/") == {}  # the probe object is gone
  probe = subprocess.run([sys.executable, str(SCRIPTS / "worker.py"), "probe", "--workdir", "gs://no-such-bucket/x"],
                         env=pod.env, capture_output=True, text=True, timeout=120)
  assert probe.returncode == 1 and "cannot write to gs://no-such-bucket/x" in probe.stderr

  def wait_for(state, flags=()):
    for _ in range(300):
      proc = pod.run("watch.py", *V5E_VM, "--run_name=rb", "--json", "--lines=0", *flags)
      status = json.loads(proc.stdout.splitlines()[-1])
      if status["by_state"].get(state) == 1:
        return status
      time.sleep(0.2)
    raise AssertionError(f"never {state}: {status}")

  launch = ["--bucket=" + bucket, "--run_name=rb", "--gin_file=gin/experiments/quickstart.gin", "--allow_dirty"]
  proc = pod.run("launch.py", *V5E_VM, *launch, "--skip_preflight", "--log_upload_s=0")
  assert proc.returncode == 0, proc.stderr
  assert f"--bucket={bucket} --run_name=rb" in proc.stdout  # the watch command it suggests
  status = wait_for("exited")
  (record,) = [json.loads(p.read_text()) for p in stub_out.glob("*.json")]
  assert f"--workdir={workdir}" in record["argv"]
  assert status["workers"][0]["workdir"] == workdir and status["log_uploads"] == [f"{workdir}/logs/slice0-worker0"]
  local_log = tmp_path / "homes" / "mm1-small" / "mm1_runs" / "rb" / "logs" / "slice0-worker0.log"
  assert "step 1 loss 9.9" in local_log.read_text()
  (first,) = _objects(emulator, logs_prefix).items()
  assert first[1].decode().startswith("=== ") and "step 1 loss 9.9" in first[1].decode()
  assert "exit code 0\n" in first[1].decode()  # uploaded after the command ended

  # The run writes its metrics and ledger into the bucket (as mm1-train does); watch reads them here.
  summary = goodput.summarize([{"started": 0.0, "updated": 200.0, "buckets": {"productive": 150.0}}])
  paths.write_text_atomic(f"{workdir}/goodput.json", json.dumps({"summary": summary, "attempts": []}))
  paths.write_text_atomic(f"{workdir}/metrics.jsonl", "".join(
      json.dumps({"step": s, "time": time.time(), "loss": 3.0 - s / 10}) + "\n" for s in range(1, 8)))
  proc = pod.run("watch.py", *V5E_VM, "--bucket=" + bucket, "--run_name=rb", "--lines=0")
  assert f"  {workdir}: step 7: loss 2.3, as of " in proc.stdout, proc.stdout + proc.stderr
  assert "  goodput 75.0 % of 200 s over 1 attempt" in proc.stdout
  assert f"  logs uploaded to {workdir}/logs/ (fetch: gcloud storage cp -r {workdir}/logs .)" in proc.stdout
  # Without --bucket, watch reads the bucket workdir the worker reports.
  status = json.loads(pod.run("watch.py", *V5E_VM, "--run_name=rb", "--json", "--lines=0").stdout.splitlines()[-1])
  assert status["workdir"] == workdir and status["metrics"]["step"] == 7
  assert status["goodput"]["goodput"] == pytest.approx(0.75) and status["run_folder_errors"] == []

  # A second start: its own object, uploaded while it runs; the first attempt's object is kept as it was.
  pod.env["STUB_SLEEP"] = "60"
  proc = pod.run("launch.py", *V5E_VM, *launch, "--skip_preflight", "--log_upload_s=0.2")
  assert proc.returncode == 0, proc.stderr
  wait_for("running")
  for _ in range(300):
    objects = _objects(emulator, logs_prefix)
    if len(objects) == 2 and b"step 1 loss 9.9" in objects[max(objects)]:
      break
    time.sleep(0.2)
  assert len(objects) == 2 and objects[first[0]] == first[1], sorted(objects)
  second = objects[max(objects)].decode()
  assert max(objects) > first[0] and second.count("=== ") == 1 and "exit code" not in second
  proc = pod.run("stop.py", *V5E_VM, "--run_name=rb", "--bucket=" + bucket, "--grace_s=30")
  assert proc.returncode == 0, proc.stderr
  assert f"{workdir}: step 7: loss 2.3" in proc.stdout and "goodput 75.0 % of 200 s" in proc.stdout
  second = _objects(emulator, logs_prefix)[max(objects)].decode()
  # The last upload came after the command ended (a bucket client's warnings may follow the line).
  assert "exit code 143\n" in second
  assert local_log.read_text().count("exit code") == 2  # the disk copy holds both starts
  assert not list(tmp_path.rglob("gs:")), "a bucket path was taken for a local folder"
