"""Tables over the eval/step_<N>.json files of a run."""

from __future__ import annotations

import json
import io

from mm1_jax import paths, tb_events


def load_results(eval_dir: paths.PathLike) -> dict[int, dict[str, float]]:
  """{step: results} for every eval/step_<N>.json, steps ascending."""
  found = {}
  for path in paths.path(eval_dir).glob("step_*.json"):
    if path.stem.endswith("_samples"):
      continue
    record = json.loads(path.read_text())
    found[int(record["step"])] = record["results"]
  return dict(sorted(found.items()))


def comparison_table(eval_dir: paths.PathLike, include_throughput: bool = False) -> str:
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


def _is_score(metric: str) -> bool:
  """A headline score: not a throughput, not a per-answer-type breakdown
  ("<benchmark>/<k>shot/<metric>/<type>", reported but too small a sample to gate on), and
  not a perplexity: it is exp(nll), whose own gate already judges it (a relative gate on
  both would let the perplexity's, far tighter whenever nll > 1, decide alone)."""
  return (not metric.endswith("tokens_per_s") and metric.count("/") <= 2
          and not metric.endswith("/perplexity"))


# Metrics where lower is better (the third part of "<benchmark>/<k>shot/<metric>").
LOWER_IS_BETTER = ("nll", "perplexity")


def lower_is_better(metric: str) -> bool:
  parts = metric.split("/")
  return len(parts) > 2 and parts[2] in LOWER_IS_BETTER


def find_regressions(eval_dir: paths.PathLike, max_regression: float, steps: list[int] | None = None
                     ) -> list[dict]:
  """Scores of `steps` (None: the newest) more than max_regression (relative) worse than
  the best earlier checkpoint's: below it for accuracies and CIDEr, above it for NLL
  (`LOWER_IS_BETTER`; perplexity is reported, not gated: `_is_score`). "drop" is the relative change for the worse."""
  runs = load_results(eval_dir)
  if not runs:
    return []
  steps = sorted(steps) if steps is not None else [max(runs)]
  found = []
  for step in steps:
    for metric, value in runs.get(step, {}).items():
      if not _is_score(metric):
        continue
      earlier = [(runs[s][metric], s) for s in runs if s < step and metric in runs[s]]
      if not earlier:
        continue
      if lower_is_better(metric):
        best, best_step = min(earlier)
        if best > 0 and value > best * (1 + max_regression):
          found.append({"step": step, "metric": metric, "value": value, "best": best,
                        "best_step": best_step, "drop": value / best - 1})
        continue
      best, best_step = max(earlier)
      if best > 0 and value < best * (1 - max_regression):
        found.append({"step": step, "metric": metric, "value": value, "best": best,
                      "best_step": best_step, "drop": 1 - value / best})
  return found


def write_tensorboard(eval_dir: paths.PathLike, logged: list[int]) -> list[int]:
  """Adds eval/<metric> scalars for steps not yet logged; returns all logged steps."""
  runs = load_results(eval_dir)
  new = [s for s in runs if s not in set(logged)]
  if new:
    # A bucket takes whole objects only: events are written locally, then uploaded.
    mirror = paths.Mirror(eval_dir) if paths.is_remote(eval_dir) else None
    folder = (mirror.local if mirror else paths.path(eval_dir)) / "tensorboard"
    writer = tb_events.ScalarWriter(folder)
    for step in new:
      writer.add_scalars(step, {f"eval/{metric}": value for metric, value in runs[step].items()})
    writer.close()
    failed = mirror.close() if mirror else []
    if failed:  # not logged: these steps are written again on the next pass
      print(f"warning: could not upload TensorBoard events to {eval_dir}: {'; '.join(failed)}", flush=True)
      return sorted(logged)
  return sorted(set(logged) | set(new))


def plot_metrics(eval_dir) -> dict:
  """One PNG per score across steps, in eval/plots/; returns {metric: path}."""
  import matplotlib  # noqa: PLC0415  (matplotlib: only for plots)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415  (matplotlib: only for plots; after use("Agg"))

  runs = load_results(eval_dir)
  metrics = sorted({m for r in runs.values() for m in r if _is_score(m)})
  folder = paths.path(eval_dir) / "plots"
  folder.mkdir(parents=True, exist_ok=True)
  written = {}
  for metric in metrics:
    points = [(s, r[metric]) for s, r in runs.items() if metric in r]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / (metric.replace("/", "__") + ".png")
    png = io.BytesIO()  # through memory: the folder may be a bucket
    fig.savefig(png, format="png")
    path.write_bytes(png.getvalue())
    plt.close(fig)
    written[metric] = path
  return written


def write_report(eval_dir: paths.PathLike, regressions: list[dict], max_regression: float,
                 failed: dict[str, str] | None = None):
  """eval/report.md: the comparison table, regressions, failed checkpoints, plots."""
  eval_dir = paths.path(eval_dir)
  plots = plot_metrics(eval_dir)
  lines = ["# Few-shot evaluation", "", comparison_table(eval_dir), ""]
  if regressions:
    lines += [f"## Regressions (more than {max_regression:.0%} worse than the best earlier checkpoint)", ""]
    lines += [f"- step {r['step']}: `{r['metric']}` {r['value']:.4f}, best {r['best']:.4f} at step "
              f"{r['best_step']} ({r['drop']:.1%} {'higher' if lower_is_better(r['metric']) else 'lower'})"
              for r in regressions]
    lines.append("")
  else:
    lines += [f"No regressions beyond {max_regression:.0%}.", ""]
  if failed:
    lines += ["## Checkpoints that could not be evaluated", ""]
    lines += [f"- step {s}: {msg}" for s, msg in sorted(failed.items(), key=lambda kv: int(kv[0]))]
    lines.append("")
  lines += ["## Plots", ""]
  lines += [f"![{m}](plots/{p.name})" for m, p in plots.items()]
  path = eval_dir / "report.md"
  paths.write_text_atomic(path, "\n".join(lines) + "\n")
  return path
