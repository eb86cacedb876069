"""`mm1-sweep`: an ablation study in one command: a grid of gin settings x seeds, one
`mm1-train` run each, then a table (mean and standard error over seeds) and plots.

  mm1-sweep --gin_file=gin/experiments/quickstart.gin --sweep=gin/ablations/image_tokens.sweep \\
      --seeds=3 --root=/tmp/tokens_study
  mm1-sweep --gin_file=gin/experiments/quickstart.gin --grid='PEAK_LR=[1e-3, 2e-3]' --root=/tmp/lr
  mm1-sweep --report_only --root=/tmp/tokens_study

A sweep file (gin/ablations/*.sweep) is written in gin syntax and read by gin's parser, but
it is not a config: each statement declares an axis (docs/ablations.md):

  NAME = [v1, v2]                      one level per value, named after it
  NAME = {"label": v1, "other": v2}    named levels
  AXIS/NAME = {"label": v, ...}        several bindings (and GIN_FILE) under one axis AXIS:
  AXIS/GIN_FILE = {"label": "gin/connectors/avg_pool.gin", ...}   a level binds what names it

NAME is a macro or a `configurable.param` binding, as --gin.NAME takes it; `GIN_FILE`
names gin files read after the base files. --grid='NAME=[v1,v2];NAME2=[...]' declares
axes the same way on the command line. The cells are the cartesian product of the axes;
each cell x seed is one run in <root>/<cell>/seed<k>, run in sequence (or, with
--jobs=tpu, one `tpu_scripts/launch.py` command each). A run whose workdir holds
train_done.json (and its final eval result, when the run evaluates) is skipped; any other
is started with the same command, which resumes it from its newest checkpoint: running the
sweep again continues it. <root>/sweep.json records the plan and each run's state, with the
code version (git commit) of each of its attempts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import gin
from gin import config_parser

from mm1_jax import gin_checks, gin_cli

SWEEP_FILE = "sweep.json"
DONE_FILE = "train_done.json"
FILE_KEY = "GIN_FILE"
LOSS = "train/loss"  # the last record of metrics.jsonl
# The seed of a run: parameter initialisation and data order (the base configs set no macro).
SEED_BINDINGS = "train.train.seed,pipeline.DataConfig.seed"
MAX_SLUG = 80
_SAFE = re.compile(r"[^A-Za-z0-9.\-]+")


class SweepError(ValueError):
  """A sweep that cannot be used, with a message meant for the user."""


# --- axes, levels and cells ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Level:
  label: str
  files: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()  # "NAME = VALUE", as --gin.NAME=VALUE gives them


@dataclasses.dataclass(frozen=True)
class Axis:
  name: str
  levels: tuple[Level, ...]


@dataclasses.dataclass(frozen=True)
class Cell:
  slug: str
  labels: tuple[tuple[str, str], ...]  # (axis, level label)
  files: tuple[str, ...]
  bindings: tuple[str, ...]


class _Gin:
  """A gin reference or macro, kept as the text it was written as."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


class _Delegate:  # gin.config_parser.ParserDelegate, duck-typed: no configurable is resolved
  def configurable_reference(self, name, evaluate):
    return _Gin(f"@{name}{'()' if evaluate else ''}")

  def macro(self, name):
    return _Gin(f"%{name}")


def _gin_text(value: Any) -> str:
  """A parsed value as gin text (Python literals and references alike)."""
  return repr(value)


def _label(value: Any) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):  # gin files
    return "+".join(Path(v).stem for v in value)
  return _gin_text(value)


def slug_part(text: str, limit: int = 40) -> str:
  """`text` as a file-name-safe word: letters, digits, '.', '-', single '_'."""
  word = _SAFE.sub("_", text).strip("_.") or "x"
  if len(word) > limit:
    word = word[:limit - 9].rstrip("_.") + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
  return word


def _files_of(value: Any, where: str) -> tuple[str, ...]:
  files = (value,) if isinstance(value, str) else value
  if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
    raise SweepError(f"{where}: {FILE_KEY} values are a gin file or a list of them, got {value!r}")
  return tuple(files)


def parse_axes(text: str, source: str = "sweep") -> list[Axis]:
  """The axes a sweep file (or --grid) declares; raises SweepError on a bad one."""
  try:
    statements = list(config_parser.ConfigParser(text, _Delegate()))
  except Exception as e:  # noqa: BLE001  (gin's parser raises SyntaxError, ValueError, TokenError)
    raise SweepError(f"{source}: not valid gin syntax: {e}") from None
  singles: list[Axis] = []
  groups: dict[str, list[tuple[str, dict, str]]] = {}
  order: list[str] = []
  for st in statements:
    if isinstance(st, config_parser.ImportStatement):
      continue
    if not isinstance(st, config_parser.BindingStatement):
      raise SweepError(f"{source}:{st.location.line_num}: only axis bindings (NAME = [...] or "
                       f"NAME = {{label: ...}}) and imports belong in a sweep, not {type(st).__name__}")
    name = f"{st.selector}.{st.arg_name}" if st.arg_name else st.selector
    where = f"{source}:{st.location.line_num} ({name})"
    value = st.value
    if "/" in st.scope:
      raise SweepError(f"{where}: one axis name before '/', got {st.scope!r}")
    if st.scope:
      if not isinstance(value, dict) or not value:
        raise SweepError(f"{where}: a binding under the axis {st.scope!r} is a dict {{level label: value}}")
      if st.scope not in groups:
        groups[st.scope] = []
        order.append(st.scope)
      groups[st.scope].append((name, value, where))
      continue
    if isinstance(value, dict) and value:
      items = list(value.items())
    elif isinstance(value, list) and value:
      items = [(_label(_files_of(v, where) if name == FILE_KEY else v), v) for v in value]
    else:
      raise SweepError(f"{where}: an axis is a non-empty list of values or a dict {{level label: value}}, "
                       f"got {value!r}")
    levels = []
    for label, v in items:
      if not isinstance(label, str):
        raise SweepError(f"{where}: level labels are strings, got {label!r}")
      if name == FILE_KEY:
        levels.append(Level(label, files=_files_of(v, where)))
      else:
        levels.append(Level(label, bindings=(f"{name} = {_gin_text(v)}",)))
    singles.append(Axis(name, tuple(levels)))
    order.append(name)
  grouped = {}
  for axis, entries in groups.items():
    labels: list[str] = []
    for _, value, where in entries:
      for label in value:
        if not isinstance(label, str):
          raise SweepError(f"{where}: level labels are strings, got {label!r}")
        if label not in labels:
          labels.append(label)
    levels = []
    for label in labels:
      files, bindings = [], []
      for name, value, where in entries:
        if label in value:
          if name == FILE_KEY:
            files += _files_of(value[label], where)
          else:
            bindings.append(f"{name} = {_gin_text(value[label])}")
      levels.append(Level(label, tuple(files), tuple(bindings)))
    grouped[axis] = Axis(axis, tuple(levels))
  by_name = {a.name: a for a in singles} | grouped
  axes = [by_name[n] for n in order]
  _check_axes(axes, source)
  return axes


def _check_axes(axes: Sequence[Axis], source: str) -> None:
  seen = set()
  for axis in axes:
    if axis.name in seen:
      raise SweepError(f"{source}: the axis {axis.name} is declared twice")
    seen.add(axis.name)
    parts = {}
    for level in axis.levels:
      part = slug_part(level.label)
      if part in parts:
        raise SweepError(f"{source}: levels {parts[part]!r} and {level.label!r} of axis {axis.name} "
                         f"give the same folder name {part!r}: label them")
      parts[part] = level.label


def split_grid(text: str) -> list[str]:
  """`NAME=[..];NAME2=[..]` -> its statements, split at ';' outside brackets and quotes."""
  out, cur, depth, quote = [], [], 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == ";" and depth == 0:
      out.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  out.append("".join(cur))
  return [s.strip() for s in out if s.strip()]


def parse_grid(text: str) -> list[Axis]:
  statements = split_grid(text)
  for s in statements:
    if "=" not in s:
      raise SweepError(f"--grid: {s!r} is not NAME=[v1,v2,...]")
  if not statements:
    raise SweepError("--grid is empty: give NAME=[v1,v2,...] (';' between axes)")
  return parse_axes("\n".join(statements) + "\n", "--grid")


def _axis_word(axis: Axis, axes: Sequence[Axis]) -> str:
  short = axis.name.rsplit(".", 1)[-1]
  if sum(a.name.rsplit(".", 1)[-1] == short for a in axes) > 1:
    short = axis.name
  return slug_part(short.lower(), 24)


def expand(axes: Sequence[Axis]) -> list[Cell]:
  """The cartesian product of the axes, first axis slowest; slugs unique and file-name safe."""
  import itertools  # noqa: PLC0415

  if not axes:
    raise SweepError("no axes: give --sweep=FILE or --grid='NAME=[v1,v2]'")
  words = [_axis_word(a, axes) for a in axes]
  cells = []
  for combo in itertools.product(*(a.levels for a in axes)):
    slug = "__".join(f"{w}-{slug_part(level.label)}" for w, level in zip(words, combo))
    if len(slug) > MAX_SLUG:
      slug = slug_part(slug, MAX_SLUG)
    cells.append(Cell(slug, tuple((a.name, lv.label) for a, lv in zip(axes, combo)),
                      tuple(f for lv in combo for f in lv.files),
                      tuple(b for lv in combo for b in lv.bindings)))
  slugs = [c.slug for c in cells]
  if len(set(slugs)) != len(slugs):
    raise SweepError("two cells got the same folder name; shorten the level labels")
  return cells


def read_sweep_file(name: str, search_paths: Sequence[str]) -> list[Axis]:
  for root in ("", *search_paths):
    p = Path(root) / name if root else Path(name)
    if p.is_file():
      return parse_axes(p.read_text(), name)
  raise SweepError(f"sweep file {name} not found (looked in: ., {', '.join(search_paths)})")


# --- checking cells against the base config --------------------------------------------------

def seed_bindings(names: Sequence[str], seed: int) -> list[str]:
  return [f"{n} = {seed}" for n in names]


def check_cells(cells: Sequence[Cell], base_files: Sequence[str], base_bindings: Sequence[str],
                search_paths: Sequence[str], seed_names: Sequence[str]) -> dict[str, bool]:
  """Parses each cell's config (base files + cell files, base flags + cell bindings + a
  seed) with gin and its checks, as mm1-train would; raises SweepError naming the cell.
  Returns {cell: whether its runs evaluate at the end}."""
  evaluates = {}
  for cell in cells:
    bindings = [*base_bindings, *cell.bindings, *seed_bindings(seed_names, 0)]
    gin.clear_config()
    try:
      gin_checks.parse([*base_files, *cell.files], bindings, search_paths)
      gin_checks.check_macros_read(bindings)
      try:
        evaluation = gin_checks._value(gin.query_parameter("train.train.evaluation"), [])  # noqa: SLF001
      except ValueError:
        evaluation = None
      evaluates[cell.slug] = evaluation is not None
    except gin_checks.ConfigError as e:
      raise SweepError(f"cell {cell.slug}: {e}") from None
    finally:
      gin.clear_config()
  return evaluates


# --- runs ------------------------------------------------------------------------------------

def run_is_done(workdir: Path, evaluates: bool = True) -> bool:
  """train_done.json is there, and so is the eval result of its final step when the run evaluates."""
  done = Path(workdir) / DONE_FILE
  if not done.is_file():
    return False
  if not evaluates:
    return True
  try:
    step = int(json.loads(done.read_text())["step"])
  except (ValueError, KeyError, TypeError):
    return False
  return (Path(workdir) / "eval" / f"step_{step}.json").is_file()


def train_command(files: Sequence[str], bindings: Sequence[str], workdir: str, extra: Sequence[str] = ()
                  ) -> list[str]:
  return [sys.executable, "-m", "mm1_jax", "train", *(f"--gin_file={f}" for f in files), *extra,
          f"--workdir={workdir}", *(f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings)]


def subprocess_runner(command: Sequence[str], log: Path) -> int:
  """Runs one command, its output appended to `log`; returns its exit code."""
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "a") as f:
    f.write(f"\n$ {shlex.join(command)}\n")
    f.flush()
    return subprocess.run(list(command), stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def git_state(folder: Path | str) -> tuple[str | None, bool | None]:
  """(the commit checked out at `folder`, whether tracked files differ from it); (None, None)
  outside a git checkout or without git."""
  git = ["git", "-C", str(folder)]
  try:
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None, None
  return commit, bool(dirty)


def code_version() -> str | None:
  """The git commit of the code the runs load (with "+dirty" when tracked files differ from
  it), or None outside a git checkout: a resumed sweep records each run's own."""
  commit, dirty = git_state(Path(__file__).resolve().parent)
  return None if commit is None else commit + ("+dirty" if dirty else "")


def _write_json(path: Path, data: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  tmp.replace(path)


def plan_runs(root: Path, cells: Sequence[Cell], seeds: Sequence[int], files: Sequence[str],
              bindings: Sequence[str], seed_names: Sequence[str], extra: Sequence[str] = ()) -> list[dict]:
  runs = []
  for cell in cells:
    for seed in seeds:
      workdir = root / cell.slug / f"seed{seed}"
      runs.append({"cell": cell.slug, "seed": seed, "workdir": str(workdir), "state": "pending",
                   "command": train_command([*files, *cell.files],
                                            [*bindings, *cell.bindings, *seed_bindings(seed_names, seed)],
                                            str(workdir), extra)})
  return runs


def run_sweep(root: Path, record: dict, *, evaluates: dict[str, bool],
              runner: Callable[[Sequence[str], Path], int] = subprocess_runner, progress: bool = True) -> int:
  """Runs every run of `record` (sweep.json's content) not yet done, in sequence, writing
  sweep.json after each; returns the number of failed runs."""
  from tqdm import tqdm  # noqa: PLC0415

  path = root / SWEEP_FILE
  old = {}
  if path.is_file():
    try:
      old = {(r["cell"], r["seed"]): r for r in json.loads(path.read_text()).get("runs", [])}
    except (ValueError, KeyError, TypeError):
      old = {}
  for run in record["runs"]:  # keep what earlier invocations recorded (times, attempts)
    prev = old.get((run["cell"], run["seed"]))
    if prev:
      run.update({k: prev[k] for k in ("started", "finished", "seconds", "attempts", "returncode", "code_versions")
                  if k in prev})
  _write_json(path, record)
  failed = 0
  bar = tqdm(record["runs"], desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
  for run in bar:
    workdir = Path(run["workdir"])
    name = f"{run['cell']}/seed{run['seed']}"
    bar.set_postfix_str(name)
    if run_is_done(workdir, evaluates.get(run["cell"], True)):
      run["state"] = "done"
      _write_json(path, record)
      continue
    run.update(state="running", started=time.time(), attempts=run.get("attempts", 0) + 1,
               code_versions=[*run.get("code_versions", []), code_version()])  # one per attempt
    _write_json(path, record)
    code = runner(run["command"], workdir / "sweep_log.txt")
    run.update(returncode=code, finished=time.time())
    run["seconds"] = round(run["finished"] - run["started"], 1)
    ok = code == 0 and run_is_done(workdir, evaluates.get(run["cell"], True))
    run["state"] = "done" if ok else "failed"
    failed += not ok
    if not ok:
      tqdm.write(f"{name}: failed (exit code {code}); its output: {workdir / 'sweep_log.txt'}. "
                 "Run the sweep again to resume it.")
    _write_json(path, record)
  bar.close()
  return failed


# --- TPU jobs --------------------------------------------------------------------------------

def _pod_workdir(pod_flags: str, run_name: str) -> str:
  """The workdir launch.py gives a run: <bucket>/runs/NAME, else <shared_dir>/runs/NAME."""
  values = {}
  text = Path(pod_flags).read_text() if Path(pod_flags).is_file() else ""
  for line in text.splitlines():
    m = re.match(r"\s*--(bucket|shared_dir)=(\S+)", line)
    if m:
      values[m.group(1)] = m.group(2)
  if "bucket" in values:
    return f"{values['bucket'].rstrip('/')}/runs/{run_name}"
  return f"{values.get('shared_dir', '/mnt/mm1').rstrip('/')}/runs/{run_name}"


def tpu_commands(record: dict, pod_flags: Sequence[str], prefix: str) -> list[list[str]]:
  """One `tpu_scripts/launch.py` command per run (pods taken in turn); sets each run's
  workdir in `record` to the one launch.py gives it."""
  commands = []
  for i, run in enumerate(record["runs"]):
    pod = pod_flags[i % len(pod_flags)]
    name = f"{prefix}-{run['cell']}-s{run['seed']}"
    if len(name) > 100:
      name = slug_part(name, 100)
    train = run["command"]
    gin = [a for a in train if a.startswith(("--gin_file=", "--gin."))]
    other = [f"--train_flag={a}" for a in train if a.startswith(("--gin_search_paths=", "--module_import="))]
    commands.append(["python", "tpu_scripts/launch.py", f"@{pod}", f"--run_name={name}", *gin, *other])
    run.update(run_name=name, workdir=_pod_workdir(pod, name), launch=commands[-1])
  return commands


# --- the table and plots ---------------------------------------------------------------------

def _is_score(metric: str) -> bool:
  return not metric.endswith("tokens_per_s") and metric.count("/") <= 2


def run_results(workdir: str) -> dict[str, float]:
  """A run's final eval scores (eval/step_<N>.json of its newest step, per-type scores
  included) and `train/loss` (the last metrics.jsonl record's loss)."""
  from mm1_jax import paths  # noqa: PLC0415
  from mm1_jax.eval import report  # noqa: PLC0415

  out: dict[str, float] = {}
  wd = paths.path(workdir)
  if (wd / "eval").exists():
    results = report.load_results(wd / "eval")
    if results:
      out.update({k: float(v) for k, v in results[max(results)].items()})
  metrics = wd / "metrics.jsonl"
  if metrics.exists():
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    for line in reversed(lines):
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut short by a crash
      if "loss" in record:
        out[LOSS] = float(record["loss"])
        break
  return out


def summarize(values: Sequence[float]) -> dict:
  """n, mean and the standard error of the mean (sample std / sqrt(n); None for n < 2)."""
  n = len(values)
  if n == 0:
    return {"n": 0, "mean": None, "se": None}
  mean = statistics.fmean(values)
  se = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
  return {"n": n, "mean": mean, "se": se}


def build_table(record: dict, metrics: Sequence[str] | None = None) -> dict:
  """{"metrics": [...], "cells": [{cell, labels, runs, stats: {metric: {n, mean, se, values}}}]}."""
  by_cell: dict[str, dict[int, dict]] = {}
  for run in record["runs"]:
    by_cell.setdefault(run["cell"], {})[run["seed"]] = run_results(run["workdir"])
  if not metrics:
    found = sorted({m for runs in by_cell.values() for r in runs.values() for m in r if m != LOSS and _is_score(m)})
    metrics = found + ([LOSS] if any(LOSS in r for runs in by_cell.values() for r in runs.values()) else [])
  cells = []
  for cell in record["cells"]:
    runs = by_cell.get(cell["slug"], {})
    stats = {}
    for metric in metrics:
      seeds = [s for s in sorted(runs) if metric in runs[s]]
      stats[metric] = {**summarize([runs[s][metric] for s in seeds]), "seeds": seeds,
                       "values": [runs[s][metric] for s in seeds]}
    cells.append({"cell": cell["slug"], "labels": dict(cell["labels"]), "runs": len(runs), "stats": stats})
  return {"axes": [a["name"] for a in record.get("axes", [])], "metrics": list(metrics),
          "seeds_planned": len(record.get("seeds", [])), "cells": cells}


def _fmt(stat: dict) -> str:
  if not stat["n"]:
    return "-"
  if stat["se"] is None:
    return f"{stat['mean']:.4f} (n=1, no SE)"
  return f"{stat['mean']:.4f} ± {stat['se']:.4f} (n={stat['n']})"


def table_markdown(table: dict) -> str:
  axes = table["axes"] or ["cell"]
  header = [*axes, *table["metrics"]]
  rows = [header, ["---"] * len(header)]
  for cell in table["cells"]:
    labels = [cell["labels"].get(a, cell["cell"]) for a in axes] if table["axes"] else [cell["cell"]]
    rows.append([*labels, *(_fmt(cell["stats"][m]) for m in table["metrics"])])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
  missing = [c["cell"] for c in table["cells"]
             if any(c["stats"][m]["n"] < table["seeds_planned"] for m in table["metrics"])]
  notes = ["", f"Each entry: mean ± standard error over seeds (sample standard deviation / sqrt(n)), "
               f"n = seeds with a result, of {table['seeds_planned']} planned. With n=1 there is no SE.",
           f"`{LOSS}`: the last training loss in metrics.jsonl; the other metrics: the final step's "
           "eval/step_<N>.json."]
  if missing:
    notes.append(f"Cells short of results (runs not done or failed): {', '.join(missing)}.")
  return "\n".join(lines + notes) + "\n"


def write_plots(table: dict, folder: Path) -> dict[str, Path]:
  """One PNG per metric: points with SE error bars, cells on the x axis; with two axes,
  the first axis on x and one line per level of the second."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  folder.mkdir(parents=True, exist_ok=True)
  axes = table["axes"]
  written = {}
  for metric in table["metrics"]:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(table["cells"]) + 2), 3.5), dpi=100)
    if len(axes) == 2:
      xs = list(dict.fromkeys(c["labels"][axes[0]] for c in table["cells"]))
      for line in dict.fromkeys(c["labels"][axes[1]] for c in table["cells"]):
        pts = [(xs.index(c["labels"][axes[0]]), c["stats"][metric]) for c in table["cells"]
               if c["labels"][axes[1]] == line and c["stats"][metric]["n"]]
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                    yerr=[p[1]["se"] or 0.0 for p in pts], marker="o", capsize=3, label=f"{axes[1]}={line}")
      ax.set_xticks(range(len(xs)), xs)
      ax.set_xlabel(axes[0])
      ax.legend(fontsize="small")
    else:
      names = [" / ".join(c["labels"].values()) if c["labels"] else c["cell"] for c in table["cells"]]
      pts = [(i, c["stats"][metric]) for i, c in enumerate(table["cells"]) if c["stats"][metric]["n"]]
      ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["se"] or 0.0 for p in pts],
                  marker="o", linestyle="none", capsize=3)
      ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right"
                    if len(names) > 3 else "center")
      if len(axes) == 1:
        ax.set_xlabel(axes[0])
    ax.set_xlim(-0.5, max(len(ax.get_xticks()), 1) - 0.5)
    ax.set_title(f"{metric} (mean ± SE over seeds)", fontsize="medium")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / (metric.replace("/", "__") + ".png")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    path.write_bytes(png.getvalue())
    plt.close(fig)
    written[metric] = path
  return written


def report(root: Path, metrics: Sequence[str] | None = None, record: dict | None = None) -> dict:
  """Writes <root>/table.md, table.json and plots/<metric>.png from what is on disk."""
  if record is None:
    path = root / SWEEP_FILE
    if not path.is_file():
      raise SweepError(f"no {SWEEP_FILE} in {root}: run the sweep first")
    record = json.loads(path.read_text())
  metrics = metrics or record.get("metrics") or None
  table = build_table(record, metrics)
  _write_json(root / "table.json", table)
  (root / "table.md").write_text(table_markdown(table))
  write_plots(table, root / "plots")
  return table


# --- the command -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="mm1-sweep", description=__doc__.split("\n\n")[0].replace("\n", " ") +
      " Re-running the command resumes a half-done sweep. docs/ablations.md describes sweep files.")
  gin_cli.add_gin_flags(p, required=False)
  p.add_argument("--sweep", action="append", default=[],
                 help="a sweep file (repeatable), e.g. gin/ablations/image_tokens.sweep")
  p.add_argument("--grid", action="append", default=[],
                 help="axes on the command line: 'NAME=[v1,v2];NAME2={\"a\": v, \"b\": w}' (repeatable)")
  p.add_argument("--seeds", type=int, default=1, help="seeds per cell: 0, 1, ..., N-1 (default 1)")
  p.add_argument("--seed_bindings", default=SEED_BINDINGS,
                 help=f"comma-separated gin parameters or macros set to the seed (default {SEED_BINDINGS})")
  p.add_argument("--root", required=True, help="the study's folder: <root>/<cell>/seed<k>, sweep.json, table.md")
  p.add_argument("--metrics", default=None,
                 help="comma-separated metrics for the table and plots, e.g. shapes_vqa/0shot/accuracy,"
                      f"{LOSS} (default: every final eval score and {LOSS})")
  p.add_argument("--dry_run", action="store_true", help="check the cells and print the runs; run nothing")
  p.add_argument("--report_only", action="store_true",
                 help="rebuild table.md, table.json and plots/ from <root> (its sweep.json) and exit")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  g = p.add_argument_group("TPU pods (tpu_scripts/launch.py)")
  g.add_argument("--jobs", choices=("local", "tpu"), default="local",
                 help="local: run here, in sequence; tpu: print one launch.py command per run")
  g.add_argument("--pod_flags", action="append", default=[], metavar="@FILE",
                 help="a pod flags file (repeatable: runs are given to the pods in turn)")
  g.add_argument("--run_prefix", default=None, help="run names are PREFIX-<cell>-s<seed> (default: <root>'s name)")
  g.add_argument("--execute", action="store_true",
                 help="with --jobs=tpu, run the launch.py commands too (each starts its run on the pod and returns)")
  p.epilog = (p.epilog or "") + "\nexit codes: 0 done; 1 a run failed (the sweep goes on; run it again to resume); " \
                                "2 bad arguments or configuration"
  return p


def _launch(command: Sequence[str], log: Path) -> int:
  """Runs a launch.py command with its output on the terminal (`log` unused)."""
  del log
  return subprocess.run(list(command), check=False).returncode


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None, *, runner: Callable[[Sequence[str], Path], int] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  root = Path(args.root).expanduser().absolute()
  metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
  if args.report_only:
    try:
      table = report(root, metrics)
    except SweepError as e:
      return _fail(str(e))
    print((root / "table.md").read_text() + f"\nwrote {root / 'table.md'}, table.json and plots/ "
          f"({len(table['metrics'])} metrics)")
    return 0
  if not args.gin_file:
    return _fail("give the base configuration: --gin_file=FILE (e.g. gin/experiments/quickstart.gin)")
  if args.seeds < 1:
    return _fail(f"--seeds={args.seeds}: at least 1")
  if args.jobs == "tpu" and not args.pod_flags:
    return _fail("--jobs=tpu needs --pod_flags=@FILE (tpu_scripts/example_pod.flags shows one)")
  if args.execute and args.jobs != "tpu":
    return _fail("--execute goes with --jobs=tpu")
  seed_names = [s.strip() for s in args.seed_bindings.split(",") if s.strip()]
  search = gin_cli.search_paths(args)
  try:
    axes = [a for f in args.sweep for a in read_sweep_file(f, search)]
    axes += [a for g in args.grid for a in parse_grid(g)]
    _check_axes(axes, "the sweep")
    cells = expand(axes)
    gin_cli.import_modules(args.module_import)
    evaluates = check_cells(cells, args.gin_file, bindings, search, seed_names)
  except SweepError as e:
    return _fail(str(e))
  seeds = list(range(args.seeds))
  extra = [f"--gin_search_paths={p}" for p in args.gin_search_paths] + \
          [f"--module_import={m}" for m in args.module_import]
  record = {
      "base": {"gin_files": list(args.gin_file), "bindings": list(bindings), "extra_flags": extra},
      "axes": [{"name": a.name, "levels": [dataclasses.asdict(lv) for lv in a.levels]} for a in axes],
      "cells": [{"slug": c.slug, "labels": [list(x) for x in c.labels], "gin_files": list(c.files),
                 "bindings": list(c.bindings)} for c in cells],
      "seeds": seeds, "seed_bindings": seed_names, "metrics": metrics, "jobs": args.jobs,
      "runs": plan_runs(root, cells, seeds, args.gin_file, bindings, seed_names, extra),
  }
  print(f"{len(cells)} cells x {len(seeds)} seeds = {len(record['runs'])} runs in {root}")
  if args.jobs == "tpu":
    commands = tpu_commands(record, [f.lstrip("@") for f in args.pod_flags], args.run_prefix or
                            slug_part(root.name or "sweep", 40))
    text = "\n".join(shlex.join(c) for c in commands)
    print(text)
    if args.dry_run:
      return 0
    _write_json(root / SWEEP_FILE, record)
    (root / "launch_commands.sh").write_text(text + "\n")
    if not args.execute:
      print(f"wrote {root / 'launch_commands.sh'}; when the runs are done, "
            f"`mm1-sweep --report_only --root={root}` reads their workdirs")
      return 0
    failed = 0
    for run, command in zip(record["runs"], commands):
      code = (runner or _launch)(command, root / "launch_log.txt")
      run["state"] = "launched" if code == 0 else "launch failed"
      failed += code != 0
      _write_json(root / SWEEP_FILE, record)
    return 1 if failed else 0
  if args.dry_run:
    for run in record["runs"]:
      state = "done" if run_is_done(Path(run["workdir"]), evaluates[run["cell"]]) else "to run"
      print(f"[{state}] {shlex.join(run['command'])}")
    return 0
  root.mkdir(parents=True, exist_ok=True)
  failed = run_sweep(root, record, evaluates=evaluates, runner=runner or subprocess_runner,
                     progress=not args.no_progress)
  report(root, metrics, record)
  print((root / "table.md").read_text())
  print(f"wrote {root / SWEEP_FILE}, table.md, table.json and plots/"
        + (f"; {failed} run(s) failed: run the same command to resume" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":  # python -m mm1_jax.sweep ...
  from mm1_jax import console

  sys.exit(console.run("sweep", sys.argv[1:]))
