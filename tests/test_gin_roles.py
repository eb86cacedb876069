"""The roles of the gin folders, checked by reading the files' include lines (nothing parsed).

  gin/models/       a model; may include gin/encoders/, gin/connectors/ and other model files
  gin/runs/         run settings; may build on other run files, never includes a model
  gin/experiments/  one run file, then one model file, then what is specific to the experiment
  gin/pods/         as an experiment, for a TPU pod (its topology, mesh and batch)

The run file comes before the model file because runs declare `MODEL = %gin.REQUIRED`,
which only a later binding satisfies. Nothing includes an experiment or a pod file.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GIN = REPO / "gin"
INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1\s*(#.*)?$""")
MAY_INCLUDE = {  # folder -> folders its files may include
    "models": {"models", "encoders", "connectors"},
    "encoders": set(),
    "connectors": set(),
    "runs": {"runs"},
    "eval": set(),
    "experiments": {"runs", "models"},
    "pods": {"runs", "models"},
}


def includes(path: str) -> list[str]:
  """The files `path` (relative to the repository) includes directly, in order."""
  found = []
  for line in (REPO / path).read_text().splitlines():
    m = INCLUDE.match(line)
    if m:
      found.append(m.group(2))
  return found


def closure(path: str) -> set[str]:
  """Every file `path` includes, directly or through other includes."""
  seen: set[str] = set()
  todo = [path]
  while todo:
    for inc in includes(todo.pop()):
      if inc not in seen and (REPO / inc).is_file():
        seen.add(inc)
        todo.append(inc)
  return seen


def role(path: str) -> str:
  parts = Path(path).parts
  return parts[1] if len(parts) > 2 and parts[0] == "gin" else "?"


def _files(*roles: str) -> list[str]:
  return sorted(str(p.relative_to(REPO)) for r in roles for p in (GIN / r).glob("*.gin"))


ALL = sorted(str(p.relative_to(REPO)) for p in GIN.rglob("*.gin"))
ENTRY_POINTS = _files("experiments", "pods")


def test_every_gin_file_is_in_a_known_folder():
  assert ENTRY_POINTS and _files("runs") and _files("models")
  assert [p for p in ALL if role(p) not in MAY_INCLUDE] == []


@pytest.mark.parametrize("path", ALL)
def test_includes_exist_and_follow_the_roles(path):
  for inc in includes(path):
    assert (REPO / inc).is_file(), f"{path} includes {inc}, which does not exist"
    allowed = ", ".join(f"gin/{r}/" for r in sorted(MAY_INCLUDE[role(path)])) or "nothing"
    assert role(inc) in MAY_INCLUDE[role(path)], (
        f"{path} includes {inc}: files in gin/{role(path)}/ may include {allowed}")


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_experiments_and_pods_include_one_run_then_one_model(path):
  direct = includes(path)
  runs = [i for i in direct if role(i) == "runs"]
  models = [i for i in direct if role(i) == "models"]
  assert len(runs) == 1 and len(models) == 1 and len(direct) == 2, (
      f"{path} must include exactly one gin/runs and one gin/models file, includes {direct}")
  assert direct.index(runs[0]) < direct.index(models[0]), (
      f"{path}: include the run ({runs[0]}) before the model ({models[0]}): the run's "
      "MODEL = %gin.REQUIRED would otherwise replace the model's")


@pytest.mark.parametrize("path", _files("runs"))
def test_runs_never_include_a_model(path):
  models = sorted(i for i in closure(path) if role(i) in ("models", "encoders", "connectors"))
  assert models == [], f"{path} includes model files {models}: models belong in the experiment"


@pytest.mark.parametrize("path", ALL)
def test_nothing_includes_an_experiment_or_pod(path):
  entry = sorted(i for i in closure(path) if role(i) in ("experiments", "pods"))
  assert entry == [], f"{path} includes {entry}: experiments and pods are not building blocks"
