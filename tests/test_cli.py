"""The command-line layer: one way to pass gin flags, platform set-up, no import circles."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import gin
import pytest

from mm1_jax import console, gin_cli

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mm1_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """mm1_jax module -> the mm1_jax modules it imports (anywhere in it, functions included)."""
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph: dict[str, set[str]] = {m: set() for m in files}
  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      for target in targets:
        while target and target not in files:  # a name inside a module -> the module
          target = target.rpartition(".")[0]
        if target and target != name and target != "mm1_jax":
          graph[name].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circle():
  found = cycles(import_graph())
  assert not found, "modules that import each other (directly or round a circle): " + "; ".join(
      " <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]


def test_split_flags_and_bindings():
  rest, flags = gin_cli.split_flags(["--gin_file=f.gin", "--gin.A=1", "--gin.B", "'x y'", "--workdir=w"])
  assert rest == ["--gin_file=f.gin", "--workdir=w"]
  assert flags == ["--gin.A=1", "--gin.B='x y'"]
  assert gin_cli.split_bindings(["--gin.pipeline.DataConfig.batch_size=8"])[1] == [
      "pipeline.DataConfig.batch_size = 8"]
  with pytest.raises(ValueError, match="needs a value"):
    gin_cli.split_flags(["--gin.A"])


def test_platform_is_cpu_only_without_accelerator(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("ALLOW_MULTIPLE_LIBTPU_LOAD", raising=False)  # restored afterwards
  monkeypatch.setattr(console, "has_accelerator", lambda: False)
  monkeypatch.setattr(console.sys, "modules", {k: v for k, v in console.sys.modules.items() if k != "jax"})
  console.prepare_platform("train")
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the user's choice wins
  console.prepare_platform("train")
  assert os.environ["JAX_PLATFORMS"] == "tpu"
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(console, "has_accelerator", lambda: True)
  console.prepare_platform("train")
  assert "JAX_PLATFORMS" not in os.environ
  console.prepare_platform("aot")  # compile-only: the CPU, even on a TPU host
  assert os.environ["JAX_PLATFORMS"] == "cpu"


def _commands(tmp_path: Path) -> dict[str, list[str]]:
  """Every command that takes gin flags, with arguments that get it as far as parsing."""
  ckpts = tmp_path / "run" / "checkpoints"
  ckpts.mkdir(parents=True)
  run = "gin/experiments/quickstart.gin"
  return {
      "train": [f"--gin_file={run}", f"--workdir={tmp_path / 'train'}"],
      "eval": ["--gin_file=gin/eval/fewshot.gin", "--gin_file=gin/models/mm1_tiny.gin",
               f"--checkpoint_dir={ckpts}"],
      "aot": [f"--gin_file={run}", "--topology=v5p-8"],
      "probe": [f"--gin_file={run}"],
      "supervised": [f"--gin_file={run}", f"--out={tmp_path / 'encoder'}"],
      "params": ["--gin_file=gin/models/mm1_tiny.gin"],
      "convert": ["export", "--gin_file=gin/models/mm1_tiny.gin", f"--params={ckpts}", f"--out={tmp_path / 'hf'}"],
      "layout": ["--gin_file=gin/models/mm1_tiny.gin"],
  }


def _exit_code(command: str, argv: list[str]) -> int:
  try:
    return console.run(command, argv)
  except SystemExit as e:
    return e.code


@pytest.mark.parametrize("command", ["train", "eval", "aot", "probe", "supervised", "params", "convert", "layout"])
def test_mistyped_macro_is_an_error_in_every_command(command, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("ALLOW_MULTIPLE_LIBTPU_LOAD", raising=False)  # mm1-aot sets it; restored afterwards
  typo, meant = ("TRAIN_STEPSS", "TRAIN_STEPS") if command == "train" else ("MODLE", "MODEL")
  argv = [*_commands(tmp_path)[command], f"--gin.{typo}=3"]
  gin.clear_config(clear_constants=True)
  try:
    assert _exit_code(command, argv) == 2
  finally:
    gin.clear_config(clear_constants=True)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "no configuration reads the macro" in err
  assert err.endswith(f"did you mean {meant}?"), err


def test_a_macro_read_only_through_another_macro_is_read():
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config("A = 1\nB = %A\nC = 2")
    from mm1_jax import gin_checks

    defined, read = gin_checks.macros_read(read_by_command=("B",))
    assert defined == {"A", "B", "C"} and read == {"A", "B"}
    gin_checks.check_macros_read(["A = 1"], ("B",))
    with pytest.raises(gin_checks.ConfigError, match="macro C"):
      gin_checks.check_macros_read(["C = 2"], ("B",))
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.parametrize("command", sorted(console.COMMANDS))
def test_every_command_has_help(command, capsys):
  assert _exit_code(command, ["export", "--help"] if command == "convert" else ["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage:")
  if command not in ("data",):  # every command that takes a configuration takes the same flags
    assert "--gin_file" in out and "--gin_search_paths" in out and "--gin.NAME=VALUE" in out


def test_a_required_macro_left_unset_says_what_to_give(capsys):
  """A model file given before the run file: the run's %gin.REQUIRED wins, and the
  message says how to fix it rather than quoting gin's internals."""
  gin.clear_config(clear_constants=True)
  try:
    code = _exit_code("params", ["--gin_file=gin/models/mm1_tiny.gin", "--gin_file=gin/runs/pretrain.gin"])
  finally:
    gin.clear_config(clear_constants=True)
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "macro %MODEL is required by the run file" in err and "after the run file" in err, err


@pytest.mark.parametrize("files, flags", [
    (["gin/experiments/quickstart.gin"], ["--gin.DATA_DIR='/data/mm1'", "--gin.TOKENIZER='shapes_sp'",
                                          "--gin.TRAIN_STEPS=3", "--gin.EVALUATION=None", "--gin.NUM_SLICES=2"]),
    (["gin/experiments/quickstart.gin", "gin/connectors/avg_pool.gin"], ["--gin.IMAGE_TOKENS=16"]),
    (["gin/experiments/sft.gin"], ["--gin.INIT_FROM='/runs/pre/checkpoints'"]),
    (["gin/pods/mm1_3b_v5p-128.gin"], ["--gin.TOPOLOGY='v5p-256'", "--gin.MESH_SHAPE=(-1, 8, 1, 1)"]),
])
def test_macros_the_shipped_files_read_are_accepted(files, flags):
  """The other side of the typo check: macros that some binding reads, directly or through
  another macro, pass (TOPOLOGY is read by mm1-aot's binding, DATA_DIR through CORPORA)."""
  import argparse

  args = argparse.Namespace(gin_file=files, gin_search_paths=[], module_import=[])
  gin.clear_config(clear_constants=True)
  try:
    gin_cli.parse(args, gin_cli.split_bindings(flags)[1])
  finally:
    gin.clear_config(clear_constants=True)
