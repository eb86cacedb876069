"""The gin command-line layer shared by every command that takes a configuration.

  --gin_file=PATH          repeatable; a path, or one relative to a search path
                           (e.g. gin/experiments/quickstart.gin from anywhere: the gin
                           files ship with the package)
  --gin.NAME=VALUE         a macro or binding, e.g. --gin.TRAIN_STEPS=20 or
                           --gin.pipeline.DataConfig.batch_size=8 (repeatable)
  --gin_search_paths=A,B   extra folders for gin files and their includes (t5x's flag;
                           repeatable, comma-separated)
  --module_import=MODULE   a module to import first (e.g. one registering seqio tasks)

A command builds its parser with `add_gin_flags`, takes the --gin.NAME=VALUE flags out
with `split_bindings` (argparse cannot declare them) and calls `parse`, which exits with
code 2 and one message on any configuration error, among them a macro set on the
command line that no configuration reads (a typo would otherwise change nothing).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Iterable, Sequence

from mm1_jax import gin_checks, gin_files

GIN_HELP = """gin:
  --gin.NAME=VALUE      bind a gin parameter or macro (repeatable), e.g.
                        --gin.TRAIN_STEPS=20  --gin.BATCH_SIZE=8
                        --gin.MIXTURE_OR_TASK_NAME="'mm1_shapes_caption'"
"""


def add_gin_flags(parser: argparse.ArgumentParser, *, required: bool = True, example: str = "") -> None:
  """Adds --gin_file, --gin_search_paths and --module_import (see the module docstring)."""
  example = example or "gin/experiments/quickstart.gin"
  parser.add_argument("--gin_file", action="append", default=[], required=required,
                      help=f"gin config file (repeatable), e.g. {example}")
  parser.add_argument("--gin_search_paths", "--gin_search_path", dest="gin_search_paths", action="append",
                      default=[], help="comma-separated folders to resolve gin files and includes (repeatable)")
  parser.add_argument("--module_import", action="append", default=[],
                      help="Python module to import before parsing gin (e.g. one registering seqio tasks)")
  parser.epilog = (parser.epilog + "\n" if parser.epilog else "") + GIN_HELP
  parser.formatter_class = argparse.RawDescriptionHelpFormatter


def split_flags(argv: Iterable[str]) -> tuple[list[str], list[str]]:
  """Takes the --gin.NAME=VALUE (or --gin.NAME VALUE) flags out of argv.

  Returns (other arguments, gin flags each as one `--gin.NAME=VALUE` string); raises
  ValueError for a flag without a value."""
  rest, flags = [], []
  it = iter(argv)
  for arg in it:
    if not arg.startswith("--gin."):
      rest.append(arg)
      continue
    if "=" not in arg:
      value = next(it, None)
      if value is None:
        raise ValueError(f"{arg} needs a value (--gin.NAME=VALUE)")
      arg = f"{arg}={value}"
    flags.append(arg)
  return rest, flags


def to_binding(flag: str) -> str:
  """`--gin.NAME=VALUE` -> the gin binding `NAME = VALUE`."""
  name, value = flag[len("--gin."):].split("=", 1)
  return f"{name} = {value}"


def split_bindings(argv: Iterable[str]) -> tuple[list[str], list[str]]:
  """As `split_flags`, with the gin flags as bindings (`NAME = VALUE`); exits 2 on a bad flag."""
  try:
    rest, flags = split_flags(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  return rest, [to_binding(f) for f in flags]


def search_paths(args: argparse.Namespace) -> list[str]:
  extra = [p for group in getattr(args, "gin_search_paths", []) for p in group.split(",") if p]
  return gin_files.search_paths(extra)


def import_modules(modules: Sequence[str]) -> None:
  sys.path.insert(0, os.getcwd())  # a module beside the user's own gin files
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      print(f"error: --module_import={module}: {e}", file=sys.stderr)
      raise SystemExit(2) from None


def parse(args: argparse.Namespace, bindings: Sequence[str], *, hint: str = "",
          read_by_command: Sequence[str] = ()) -> None:
  """Imports --module_import modules, parses --gin_file and the bindings, and checks them.

  `read_by_command`: macros the command itself reads (e.g. MODEL, via
  gin.query_parameter), which no binding need refer to. Exits 2 on a bad config."""
  import_modules(getattr(args, "module_import", []))
  try:
    gin_checks.parse(args.gin_file, bindings, search_paths(args))
    gin_checks.check_macros_read(bindings, read_by_command)
  except gin_checks.ConfigError as e:
    print(f"error: {e}" + (f"\n{hint}" if hint and "%MODEL" in str(e) else ""), file=sys.stderr)
    raise SystemExit(2) from None
