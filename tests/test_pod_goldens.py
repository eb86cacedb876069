"""Each pod file's parsed config against its golden copy in tests/golden/pods/.

A golden holds `gin.config_str()` after parsing the pod file alone: every binding and
macro from the pod, its run and its model, for all three commands that read it
(mm1-train, mm1-aot, mm1-eval). Any change to what a pod would run, made in any file it
includes, shows up here as a diff.

After a deliberate change: MM1_UPDATE_GOLDEN=1 pytest tests/test_pod_goldens.py, then
review the diff of tests/golden/pods/.
"""

import os
from pathlib import Path

import gin
import pytest

REPO = Path(__file__).resolve().parent.parent
PODS = sorted((REPO / "gin" / "pods").glob("*.gin"))
GOLDEN_DIR = REPO / "tests" / "golden" / "pods"
UPDATE = bool(os.environ.get("MM1_UPDATE_GOLDEN"))


pytestmark = pytest.mark.usefixtures("clean_gin")  # conftest.py


def test_every_golden_has_its_pod():
  stale = sorted({p.name for p in GOLDEN_DIR.glob("*.gin")} - {p.name for p in PODS})
  if UPDATE:
    for name in stale:
      (GOLDEN_DIR / name).unlink()
    stale = []
  assert PODS and stale == [], f"goldens without a pod file: {stale} (MM1_UPDATE_GOLDEN=1 removes them)"


@pytest.mark.parametrize("pod", PODS, ids=lambda p: p.stem)
def test_pod_config_matches_golden(pod):
  gin.parse_config_files_and_bindings([str(pod)], [])
  current = gin.config_str()
  golden = GOLDEN_DIR / pod.name
  if UPDATE:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    golden.write_text(current)
  assert golden.is_file(), f"no golden for {pod.name}: run with MM1_UPDATE_GOLDEN=1 and review it"
  assert current == golden.read_text(), f"{pod.name}: parsed config differs from {golden} (see the docstring)"
