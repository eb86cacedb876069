"""Every gin file parses; the quickstart's macros and overrides behave as documented."""

from pathlib import Path

import gin
import pytest

from mm1_jax import gin_checks, gin_cli
from mm1_jax.eval import run as eval_run

REPO = Path(__file__).resolve().parent.parent
GIN_FILES = sorted(p.relative_to(REPO) for p in (REPO / "gin").rglob("*.gin"))
# Files that only make sense on top of a model file (connectors use its COMPUTE_DTYPE).
NEEDS_MODEL = {"gin/eval/fewshot.gin", *(str(p) for p in GIN_FILES if p.parts[1] == "connectors")}
# Run files: a model file comes after them (their MODEL is %gin.REQUIRED), then what an
# experiment would set.
RUNS = {str(p) for p in GIN_FILES if p.parts[1] == "runs"}
RUN_MACROS = ["TRAIN_STEPS = 1", "BATCH_SIZE = 8", "MIXTURE_OR_TASK_NAME = 'x'", "INIT_FROM = '/tmp/x'"]


pytestmark = pytest.mark.usefixtures("clean_gin")  # conftest.py


def test_there_are_gin_files():
  assert {"gin/experiments/quickstart.gin", "gin/models/mm1_tiny.gin"} <= {str(p) for p in GIN_FILES}


@pytest.mark.parametrize("path", [str(p) for p in GIN_FILES])
def test_gin_file_parses(path):
  files = [path]
  if path in NEEDS_MODEL:
    files = ["gin/models/mm1_tiny.gin", path]
  elif path in RUNS:
    files = [path, "gin/models/mm1_tiny.gin"]
  bindings = RUN_MACROS if path in RUNS else []
  gin.parse_config_files_and_bindings(files, bindings)
  gin_checks.check_types(files, bindings)  # every shipped binding has the type its parameter wants


def test_quickstart_macros_and_overrides():
  args, bindings = gin_cli.split_bindings(
      ["--gin_file=gin/experiments/quickstart.gin", "--gin.TRAIN_STEPS=20", "--gin.BATCH_SIZE", "8",
       "--workdir=/tmp/x"])
  assert args == ["--gin_file=gin/experiments/quickstart.gin", "--workdir=/tmp/x"]
  assert bindings == ["TRAIN_STEPS = 20", "BATCH_SIZE = 8"]
  gin.parse_config_files_and_bindings(["gin/experiments/quickstart.gin"], bindings)
  assert gin.query_parameter("%TRAIN_STEPS") == 20
  data = gin.query_parameter("train.train.data").scoped_configurable_fn()
  assert data.batch_size == 8 and data.mixture_or_task_name == "mm1_shapes_pretrain"
  assert dict(data.mixture_rates) == {"mm1_shapes_interleaved": 45, "mm1_shapes_caption": 45,
                                      "mm1_shapes_text": 10}
  model = gin.query_parameter("train.train.model").scoped_configurable_fn()
  assert model.connector.num_tokens == 16 and model.decoder.vocab_size == 256


def test_train_and_eval_share_model_and_mesh():
  gin.parse_config_files_and_bindings(["gin/experiments/quickstart.gin"], [])
  train_model = gin.query_parameter("train.train.model").scoped_configurable_fn()
  eval_model = gin.query_parameter(f"{eval_run.__name__.split('.', 1)[1]}.evaluate.model")
  assert eval_model.scoped_configurable_fn() == train_model


def test_quickstart_config_matches_golden():
  """A silent change to what the quickstart runs shows up here.

  After a deliberate change: MM1_UPDATE_GOLDEN=1 pytest tests/test_gin.py, then review the diff.
  """
  import os
  gin.parse_config_files_and_bindings(["gin/experiments/quickstart.gin"], [])
  current = gin.config_str()
  golden = REPO / "tests" / "golden" / "quickstart.gin"
  if os.environ.get("MM1_UPDATE_GOLDEN"):
    golden.write_text(current)
  assert current == golden.read_text(), "quickstart config changed; see the docstring"
