"""A stand-in for `gcloud`, put first on PATH by tests/test_tpu_scripts.py.

Every call appends its arguments as one JSON line to $FAKE_GCLOUD_LOG. What it answers:
- the first unused rule of $FAKE_GCLOUD_RULES (a JSON list) whose `when` strings all occur
  in the call's arguments: {"when": [...], "stdout": "", "stderr": "", "rc": 0,
  "times": 1 (null: any number)};
- otherwise, with $FAKE_GCLOUD_EXEC_HOME set, `tpu-vm ssh NODE --command=CMD` runs CMD with
  bash once per worker ($FAKE_GCLOUD_WORKERS, default 1), HOME=$FAKE_GCLOUD_EXEC_HOME/NODE
  and MM1_WORKER_ID=i, as gcloud would on each TPU VM;
- otherwise exit 0, no output.
"""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path


def _locked_rules(argv: list[str]) -> dict | None:
  path = os.environ.get("FAKE_GCLOUD_RULES")
  if not path:
    return None
  joined = " ".join(argv)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    rules = json.loads(Path(path).read_text())
    used_path = Path(path + ".used")
    used = json.loads(used_path.read_text()) if used_path.exists() else {}
    for i, rule in enumerate(rules):
      times = rule.get("times", 1)
      if all(w in joined for w in rule["when"]) and (times is None or used.get(str(i), 0) < times):
        used[str(i)] = used.get(str(i), 0) + 1
        used_path.write_text(json.dumps(used))
        return rule
  return None


def main() -> int:
  argv = sys.argv[1:]
  with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    fcntl.flock(log, fcntl.LOCK_EX)
    log.write(json.dumps(argv) + "\n")
  rule = _locked_rules(argv)
  if rule is not None:
    sys.stdout.write(rule.get("stdout", ""))
    sys.stderr.write(rule.get("stderr", ""))
    return rule.get("rc", 0)
  exec_home = os.environ.get("FAKE_GCLOUD_EXEC_HOME")
  if exec_home and argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    node = argv[4]
    command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
    home = Path(exec_home) / node
    home.mkdir(parents=True, exist_ok=True)
    rc = 0
    for i in range(int(os.environ.get("FAKE_GCLOUD_WORKERS", "1"))):
      env = dict(os.environ, HOME=str(home), MM1_WORKER_ID=str(i))
      rc = max(rc, subprocess.run(["bash", "-c", command], env=env).returncode)
    return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
