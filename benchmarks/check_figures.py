"""Every measured figure in the project's Markdown comes from a committed record.

  python -m benchmarks.check_figures              # README.md, benchmarks/README.md, docs/*.md
  python -m benchmarks.check_figures docs/results.md

A figure is a number with a unit of measurement (%, s, ms, min, GiB, GFLOP/s, TFLOP/s,
tokens/s, images/s, sequences/s, an x right after it for a ratio: 1.2x) or a bare decimal of two or more
places (an accuracy, a loss). A block (paragraph, list item or table) that holds figures must
cite at least one record as `results/<name>.json` (a path under benchmarks/results/), in the
block itself or, for a table, in the paragraph just above it; every cited record must exist,
and every figure must be one of the cited records' values at the printed precision (as is,
as a percentage of a fraction, or scaled by 2^30, 1e3, 1e6, 1e9 or 1e12). Code spans and code
blocks are not read. A block that states figures nobody measured (a datasheet peak, a
recipe's batch) says so with `<!-- not measured -->`.

Exit status 1 lists each figure without a record.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

UNITS = r"(?:\s?(?:%|ms\b|s\b|min\b|minutes\b|GiB\b|GFLOP/s|TFLOP/s|tokens/s|images/s|sequences/s)|x\b)"
FIGURE = re.compile(rf"(?<![\w.\-/])(\d{{1,3}}(?:,\d{{3}})+|\d+(?:\.\d+)?)({UNITS})"
                    rf"|(?<![\w.\-/])(?<!Python )(\d+\.\d{{2,}})(?![\w.])")
CITATION = re.compile(r"results/[\w./\-]+?\.json")
SCALES = (1.0, 100.0, 1 / 2**30, 1e-3, 1e-6, 1e-9, 1e-12, 1e3)


def pages() -> list[Path]:
  """The documentation the rule covers: the two READMEs and every page under docs/."""
  return [REPO / "README.md", REPO / "benchmarks" / "README.md",
          *sorted((REPO / "docs").glob("*.md"))]


def _blocks(text: str) -> list[tuple[int, str, bool]]:
  """(first line number, text, is_table) of each block, code blocks dropped."""
  out, cur, start, in_code = [], [], 0, False
  for i, line in enumerate(text.splitlines(), 1):
    if line.strip().startswith("```"):
      in_code = not in_code
      if cur:
        out.append((start, "\n".join(cur)))
        cur = []
      continue
    if in_code:
      continue
    new_item = re.match(r"\s*([-*]|\d+\.)\s", line) or line.startswith("#")
    if not line.strip() or (new_item and cur and not cur[-1].lstrip().startswith("|")):
      if cur:
        out.append((start, "\n".join(cur)))
      cur, start = ([line], i) if line.strip() else ([], 0)
      continue
    if not cur:
      start = i
    cur.append(line)
  if cur:
    out.append((start, "\n".join(cur)))
  return [(n, b, b.lstrip().startswith("|")) for n, b in out]


def _numbers(obj) -> list[float]:
  if isinstance(obj, bool):
    return []
  if isinstance(obj, (int, float)):
    return [float(obj)] if math.isfinite(obj) else []
  if isinstance(obj, dict):
    return [v for x in obj.values() for v in _numbers(x)]
  if isinstance(obj, list):
    return [v for x in obj for v in _numbers(x)]
  return []


def _matches(printed: str, values: list[float]) -> bool:
  s = printed.replace(",", "")
  places = len(s.split(".")[1]) if "." in s else 0
  target = float(s)
  for v in values:
    for scale in SCALES:
      if round(v * scale, places) == target or (places == 0 and round(v * scale) == target):
        return True
  return False


def check(path: Path) -> list[str]:
  problems = []
  name = str(path.relative_to(REPO)) if REPO in path.parents else path.name
  blocks = _blocks(path.read_text())
  for k, (line, block, is_table) in enumerate(blocks):
    if "<!-- not measured" in block or block.startswith("#"):
      continue
    text = re.sub(r"`[^`]*`(?!/)", lambda m: m.group(0) if CITATION.search(m.group(0)) else "", block)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # link targets
    figures = [m.group(1) or m.group(3) for m in FIGURE.finditer(re.sub(r"<!--.*?-->", "", text))]
    if not figures:
      continue
    cited = CITATION.findall(block)
    if is_table and k > 0:
      cited += CITATION.findall(blocks[k - 1][1])
    if not cited:
      problems.append(f"{name}:{line}: figures {figures[:4]} cite no record (results/<name>.json)")
      continue
    values: list[float] = []
    for c in dict.fromkeys(cited):
      f = RESULTS / c.split("results/", 1)[1]
      if not f.exists():
        problems.append(f"{name}:{line}: cited record {c} does not exist")
        continue
      values += _numbers(json.loads(f.read_text()))
    for fig in figures:
      if not _matches(fig, values):
        problems.append(f"{name}:{line}: figure {fig} is in none of {sorted(set(cited))}")
  return problems


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("files", nargs="*", help="Markdown files (default: README.md, "
                 "benchmarks/README.md and docs/*.md)")
  args = p.parse_args(argv)
  files = [REPO / f if not Path(f).is_absolute() else Path(f) for f in args.files] or pages()
  problems = [x for f in files for x in check(f)]
  print("\n".join(problems) if problems else "every figure traces to a record")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
