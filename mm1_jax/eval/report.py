"""Tables over the eval/step_<N>.json files of a run."""

from __future__ import annotations

import json
from pathlib import Path


def load_results(eval_dir: str | Path) -> dict[int, dict[str, float]]:
  """{step: results} for every eval/step_<N>.json, steps ascending."""
  found = {}
  for path in Path(eval_dir).glob("step_*.json"):
    if path.stem.endswith("_samples"):
      continue
    record = json.loads(path.read_text())
    found[int(record["step"])] = record["results"]
  return dict(sorted(found.items()))


def comparison_table(eval_dir: str | Path, include_throughput: bool = False) -> str:
  """A markdown table: one row per metric, one column per evaluated step, then the change."""
  runs = load_results(eval_dir)
  if not runs:
    return f"no eval results in {eval_dir}"
  steps = list(runs)
  metrics = sorted({k for r in runs.values() for k in r
                    if include_throughput or not k.endswith("tokens_per_s")})
  header = ["metric"] + [f"step {s}" for s in steps] + (["change"] if len(steps) > 1 else [])
  rows = [header, ["---"] * len(header)]
  for m in metrics:
    vals = [runs[s].get(m) for s in steps]
    row = [m] + ["-" if v is None else f"{v:.3f}" for v in vals]
    if len(steps) > 1:
      first, last = vals[0], vals[-1]
      row.append("-" if first is None or last is None else f"{last - first:+.3f}")
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows)
