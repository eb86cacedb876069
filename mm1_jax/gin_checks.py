"""Checks on a parsed gin config, each failing with one message that names the binding.

- `parse`: gin files and --gin bindings; gin's own errors (unknown configurable or
  parameter, syntax, missing file, undefined macro) come back as `ConfigError` with
  gin's location line, without a traceback.
- `check_types`: every bound value against the annotation of the parameter it sets
  (following macros), e.g. `TRAIN_STEPS = '10'` for an `int`; the message names the
  file and line (or --gin flag) that set it.
- `check_macros_read`: a macro set on the command line must be read by something
  (a binding, through any chain of macros, or the command itself); a mistyped name
  fails naming the closest macro that exists.
- `check_workdir_config`: a workdir belongs to one run; a config that differs from the
  one recorded there is refused with a diff, unless the change is allowed (the old
  config is then kept as config.gin.<time>).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import re
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import gin
from gin import config as gin_config

# Bindings that decide how a run is driven, not what it computes: they may change
# between the runs that share a workdir.
OPERATIONAL = ("train.train.stop_after_steps", "train.train.progress")


class ConfigError(ValueError):
  """A gin config that cannot be used, with a message meant for the user."""


# --- parsing ---------------------------------------------------------------------------

def parse(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
  search_paths = list(dict.fromkeys(search_paths))
  for f in files:
    if _resolve_file(f, search_paths) is None:
      raise ConfigError(f"gin file {f} not found (looked in: ., {', '.join(search_paths)})")
  for path in search_paths:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=True)
  except (ValueError, TypeError, SyntaxError, OSError, ImportError, AttributeError) as e:
    raise ConfigError(_gin_message(e, bindings)) from None
  check_types(files, bindings, search_paths)


def _gin_message(e: BaseException, bindings: Sequence[str]) -> str:
  text = "".join(traceback.format_exception_only(type(e), e)).strip()
  m = re.search(r"No bindings specified for '([^'/]+)/gin.macro'", text)
  if m:  # gin appends the whole config to this one
    return f"gin config: macro %{m.group(1)} is used but never set"
  m = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED` but not subsequently overridden", text)
  if m:
    name = m.group(1)
    what = "a model file" if name == "MODEL" else f"a file that sets {name}"
    return (f"gin config: macro %{name} is required by the run file but never set: give {what} after "
            f"the run file, or --gin.{name}=VALUE (an experiment in gin/experiments/ sets them all)")

  def flag(match):  # gin numbers the --gin bindings as lines of one string
    i = int(match.group(1)) - 1
    return f"In --gin.{bindings[i].replace(' = ', '=', 1)}" if 0 <= i < len(bindings) else match.group(0)
  return "gin config: " + re.sub(r"In bindings string line (\d+)", flag, text)


# --- where a binding was set ------------------------------------------------------------

def _resolve_file(name: str, search_paths: Sequence[str]) -> Path | None:
  for root in ("", *search_paths):
    p = Path(root) / name if root else Path(name)
    if p.is_file():
      return p
  return None


def _sources(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]
             ) -> list[tuple[str, list[str]]]:
  """(name, lines) in the order gin reads them: each file with its includes, then flags."""
  out, seen = [], set()

  def add(name: str):
    path = _resolve_file(name, search_paths)
    if path is None or path.resolve() in seen:
      return
    seen.add(path.resolve())
    lines = path.read_text().splitlines()
    for line in lines:
      m = re.match(r"""\s*include\s+['"](.+)['"]""", line)
      if m:
        add(m.group(1))
    out.append((str(path), lines))

  for f in files:
    add(f)
  out.extend((f"--gin.{b.replace(' = ', '=', 1)}", [b]) for b in bindings)
  return out


def _locate(sources, pattern: str, block: str | None = None, param: str | None = None) -> str | None:
  """The last place (`file:line` or the --gin flag) whose line matches, gin's winner."""
  where = None
  for name, lines in sources:
    header = None
    for i, line in enumerate(lines, 1):
      m = re.match(r"^([\w.]+):\s*(#.*)?$", line)
      if m:
        header = m.group(1)
        continue
      if line and not line[0].isspace():
        header = None
      hit = re.match(pattern, line) or (
          block is not None and header is not None and (header == block or header.endswith("." + block))
          and re.match(rf"^\s+{param}\s*=", line))
      if hit:
        where = name if name.startswith("--gin.") else f"{name}:{i}"
  return where


# --- types -------------------------------------------------------------------------------

def _short(selector: str) -> str:
  parts = selector.split(".")
  return ".".join(parts[-2:]) if len(parts) >= 2 else selector


def _type_name(t: Any) -> str:
  return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _matches(value: Any, ann: Any) -> bool:
  """Whether `value` fits the annotation; anything not understood is accepted."""
  if ann is Any or ann is inspect.Parameter.empty:
    return True
  origin, args = typing.get_origin(ann), typing.get_args(ann)
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, a) for a in args)
  if ann is type(None) or ann is None:
    return value is None
  if ann is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if ann is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if ann in (str, bool):
    return isinstance(value, ann)
  if origin in (tuple, list, collections.abc.Sequence):
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
      return False
    if origin is tuple and args and args[-1] is not Ellipsis:
      return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    inner = args[0] if args else Any
    # A macro or configurable inside a container is not followed: accepted.
    return all(isinstance(v, gin_config.ConfigurableReference) or _matches(v, inner) for v in value)
  if origin in (dict, collections.abc.Mapping):
    return isinstance(value, dict)
  if isinstance(ann, type):
    return isinstance(value, ann)
  return True


def _hints(fn) -> dict[str, Any]:
  target = fn.__init__ if inspect.isclass(fn) and not dataclasses.is_dataclass(fn) else fn
  try:
    return typing.get_type_hints(target)
  except Exception:  # noqa: BLE001  (unresolvable forward references: nothing to check)
    return {}


_UNKNOWN = object()


@dataclasses.dataclass(frozen=True)
class _Built:
  """A reference to a configurable class: its value will be an instance of `cls`."""
  cls: type


def _value(ref: Any, macros: list[str]) -> Any:
  """Follows macro references to the literal they stand for; references to other
  configurables give the class they build (or _UNKNOWN)."""
  for _ in range(100):
    if not isinstance(ref, gin_config.ConfigurableReference):
      return ref
    scopes = getattr(ref, "_scopes", [])
    if ref.configurable.name == "macro" and scopes:
      name = scopes[-1]
      macros.append(name)
      ref = gin_config._CONFIG.get((name, "gin.macro"), {}).get("value", _UNKNOWN)  # noqa: SLF001
      continue
    wrapped = ref.configurable.wrapped
    return _Built(wrapped) if inspect.isclass(wrapped) and getattr(ref, "_evaluate", False) else _UNKNOWN
  return _UNKNOWN


def check_types(files: Sequence[str] = (), bindings: Sequence[str] = (), search_paths: Sequence[str] = ()
                ) -> None:
  """Raises ConfigError for the first bound value whose type contradicts its annotation."""
  sources = None
  for (scope, selector), params in list(gin_config._CONFIG.items()):  # noqa: SLF001
    if selector == "gin.macro":
      continue
    try:
      configurable = gin_config._REGISTRY.get_match(selector)  # noqa: SLF001
    except Exception:  # noqa: BLE001
      configurable = None
    if configurable is None:
      continue
    hints = _hints(configurable.wrapped)
    for param, raw in params.items():
      if param not in hints:
        continue
      macros: list[str] = []
      value = _value(raw, macros)
      if value is _UNKNOWN:
        continue
      ann = hints[param]
      if isinstance(value, _Built):
        ok = ann is Any or not isinstance(ann, type) or issubclass(value.cls, ann)  # Any is a class in 3.11
        shown = f"@{value.cls.__name__}()"
      else:
        ok = _matches(value, ann)
        shown = repr(value)
      if ok:
        continue
      if sources is None:
        sources = _sources(files, bindings, search_paths)
      name = f"{scope + '/' if scope else ''}{_short(selector)}.{param}"
      if macros:
        where = _locate(sources, rf"^\s*{re.escape(macros[-1])}\s*=")
        set_by = f"{' -> '.join('%' + m for m in macros)} = {shown}, set in {where or 'the gin config'}"
      else:
        short = _short(selector)
        where = _locate(sources, rf"^\s*(?:[\w.]*\.)?{re.escape(short)}\.{param}\s*=", short, param)
        set_by = f"{shown}, set in {where or 'the gin config'}"
      raise ConfigError(f"gin config: {name} expects {_type_name(ann)}, got {type(value).__name__} "
                        f"({set_by})")


# --- macros set on the command line --------------------------------------------------------

def _macro_refs(value: Any, out: set[str]) -> None:
  """Adds the names of the macros `value` refers to (inside containers too)."""
  if isinstance(value, gin_config.ConfigurableReference):
    scopes = getattr(value, "_scopes", [])
    if value.configurable.name == "macro" and scopes:
      out.add(scopes[-1])
  elif isinstance(value, dict):
    for v in value.values():
      _macro_refs(v, out)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_refs(v, out)


def macros_read(read_by_command: Sequence[str] = ()) -> tuple[set[str], set[str]]:
  """(macros defined, macros read) in the parsed config: read means referred to by a
  binding of a configurable, or by the command, directly or through other macros."""
  defined = {scope for (scope, selector) in gin_config._CONFIG if selector == "gin.macro"}  # noqa: SLF001
  read: set[str] = set(read_by_command)
  for (scope, selector), params in gin_config._CONFIG.items():  # noqa: SLF001
    if selector != "gin.macro":
      for value in params.values():
        _macro_refs(value, read)
  frontier = set(read)
  while frontier:  # a macro read is as good as the macros its value refers to
    name = frontier.pop()
    found: set[str] = set()
    _macro_refs(gin_config._CONFIG.get((name, "gin.macro"), {}).get("value"), found)  # noqa: SLF001
    frontier |= found - read
    read |= found
  return defined, read


def check_macros_read(bindings: Sequence[str], read_by_command: Sequence[str] = ()) -> None:
  """Raises ConfigError for a macro binding among `bindings` that nothing reads."""
  defined, read = macros_read(read_by_command)
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if "." in name or "/" in name or name in read:
      continue
    close = difflib.get_close_matches(name, sorted(read | defined - {name}), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"--gin.{binding.replace(' = ', '=', 1)}: no configuration reads the macro {name}{hint}")


# --- one run per workdir ------------------------------------------------------------------

def _comparable(text: str) -> list[str]:
  return [line for line in text.splitlines() if not line.startswith(tuple(f"{o} =" for o in OPERATIONAL))]


def check_workdir_config(workdir: Path, config: str, *, allow_change: bool, archive: bool = True) -> str | None:
  """Compares `config` with <workdir>/config.gin when the workdir holds a run.

  Returns None when they agree (or the workdir is new); with allow_change, archives the
  old config (unless archive=False: another process of the run does) and returns its new
  name. Otherwise raises ConfigError with the diff.
  """
  recorded = workdir / "config.gin"
  has_run = (workdir / "metrics.jsonl").exists() or any((workdir / "checkpoints").glob("[0-9]*"))
  if not recorded.exists() or not has_run:
    return None
  old = recorded.read_text()
  if _comparable(old) == _comparable(config):
    return None
  diff = "\n".join(difflib.unified_diff(_comparable(old), _comparable(config), f"{recorded} (recorded)",
                                        "this run", lineterm="", n=1))
  if not allow_change:
    raise ConfigError(f"{workdir} holds a run with another config:\n{diff}\n"
                      f"Use another --workdir, or pass --allow_config_change to continue this run "
                      f"with the new config (the recorded one is kept as config.gin.<time>).")
  archived = recorded.with_name(f"config.gin.{time.strftime('%Y%m%dT%H%M%S')}")
  if archive:
    recorded.rename(archived)
  print(f"config changed (allowed); the previous one is kept as {archived}:\n{diff}")
  return str(archived)
