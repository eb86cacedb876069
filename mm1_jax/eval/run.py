"""`mm1-eval`: evaluate saved checkpoints of a run, once or as a nightly watcher.

Exit codes: 0 done; 2 nothing evaluated (no checkpoint yet, or a usage or config
error, e.g. an unknown benchmark name); 3 a metric regressed beyond
`max_regression` against the best earlier checkpoint (the list is printed and written
to eval/report.md); 4 a checkpoint could not be evaluated (recorded in
eval/watch_state.json and not retried unless --force).
"""

from __future__ import annotations

import json
import sys
import time

import jax

from mm1_jax import paths
from mm1_jax import sharding as sharding_lib
from mm1_jax.checkpoint import Checkpointer
from mm1_jax.contrastive import ImageObjectiveConfig
from mm1_jax.eval import fewshot, report
from mm1_jax.model import MM1, MM1Config
from mm1_jax.train import dummy_batch, init_param_shardings

EXIT_NOTHING, EXIT_REGRESSION, EXIT_FAILED = 2, 3, 4


class _WatchState:
  """eval/watch_state.json: failed steps and the steps already sent to TensorBoard.

  Which steps are evaluated is the set of eval/step_<N>.json files (each written
  atomically), so a restarted watcher carries on where it stopped."""

  def __init__(self, eval_dir):
    self.path = eval_dir / "watch_state.json"
    state = json.loads(self.path.read_text()) if self.path.exists() else {}
    self.failed: dict[str, str] = state.get("failed", {})
    self.logged: list[int] = state.get("tensorboard_steps", [])

  def save(self) -> None:
    paths.write_text_atomic(self.path, json.dumps(
        {"failed": self.failed, "tensorboard_steps": sorted(self.logged)}, indent=1))


def _wanted_steps(steps: str, available: list[int], directory) -> list[int]:
  if steps == "latest":
    return available[-1:]
  if steps == "all":
    return available
  wanted = [int(s) for s in steps.split(",")]
  missing = sorted(set(wanted) - set(available))
  if missing:
    raise SystemExit(f"steps {missing} not in {directory} (have {available})")
  return wanted


def evaluate(*, workdir: str, model: MM1Config | ImageObjectiveConfig = MM1Config(),
             evaluation: fewshot.FewShotConfig | None = fewshot.FewShotConfig(),
             mesh: sharding_lib.MeshConfig = sharding_lib.MeshConfig(),
             checkpoint_dir: str | None = None, steps: str = "latest", force: bool = False,
             watch: bool = False, poll_seconds: float = 0.0, idle_timeout: float = 3600.0,
             max_regression: float = 0.05, progress: bool = True) -> int:
  """Evaluates checkpoints and writes <workdir>/eval/step_<N>.json for each.

  Args:
    workdir: run directory; results go to its eval/ folder.
    model, evaluation, mesh: as for training.
    checkpoint_dir: default <workdir>/checkpoints.
    steps: 'latest', 'all', or comma-separated step numbers (ignored with watch).
    force: re-evaluate steps that already have results (or failed before).
    watch: evaluate every checkpoint not yet evaluated, then write TensorBoard scalars,
      eval/report.md with a plot per metric, and check for regressions.
    poll_seconds: with watch, look for new checkpoints this often (0: one pass, for cron).
    idle_timeout: with polling, stop after this long without a new checkpoint.
    max_regression: relative drop against the best earlier checkpoint that fails the
      watch (0.05: 5 % below the best).
  Returns:
    an exit code (module docstring).
  """
  if not isinstance(model, MM1Config):
    raise SystemExit(f"error: mm1-eval scores MM1 models; this run trains an image encoder "
                     f"({type(model).__name__}): judge its trunk with mm1-probe")
  if evaluation is None:
    raise SystemExit("error: no evaluation configured (EVALUATION = None): add "
                     "--gin_file=gin/eval/fewshot.gin or bind EVALUATION = @fewshot.FewShotConfig()")
  try:
    fewshot.benchmark_specs(evaluation)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NOTHING

  ckpt = Checkpointer(checkpoint_dir or paths.path(workdir) / "checkpoints")
  out = paths.path(workdir) / "eval"
  state = _WatchState(out)
  evaluator = target = None
  last_new = time.monotonic()
  code = 0
  try:
    while True:
      ckpt.reload()
      available = ckpt.all_steps()
      if watch:
        wanted = [s for s in available if force or not ((out / f"step_{s}.json").exists()
                                                         or str(s) in state.failed)]
      else:
        if not available:
          print(f"no checkpoints in {ckpt.directory}")
          return EXIT_NOTHING
        wanted = _wanted_steps(steps, available, ckpt.directory)
      if wanted and evaluator is None:  # built once, on the first checkpoint to evaluate
        device_mesh = sharding_lib.make_mesh(mesh)
        mm1 = MM1(model)
        abstract, shardings = init_param_shardings(mm1, dummy_batch(1, 8, 1, model), device_mesh, mesh.rules)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
        evaluator = fewshot.Evaluator(evaluation, mm1, device_mesh, mesh.rules)
      evaluated = []
      for step in wanted:
        if not force and not watch and (out / f"step_{step}.json").exists():
          print(f"step {step}: already evaluated ({out / f'step_{step}.json'})")
          continue
        try:
          params = ckpt.restore_params(step, target)
        except Exception as e:  # noqa: BLE001  (a broken checkpoint must not stop the watcher)
          if not watch:
            raise
          state.failed[str(step)] = f"{type(e).__name__}: {e}"[:500]
          print(f"step {step}: could not restore the checkpoint: {state.failed[str(step)]}")
          code = EXIT_FAILED
          continue
        state.failed.pop(str(step), None)
        evaluator.evaluate_and_write(params, step, workdir)
        evaluated.append(step)
        del params
      if watch:
        state.logged = report.write_tensorboard(out, state.logged)
        regressions = report.find_regressions(out, max_regression, steps=evaluated)
        report.write_report(out, regressions, max_regression, failed=state.failed)
        state.save()
        if regressions:
          print(f"REGRESSION beyond {max_regression:.0%} of the best earlier checkpoint:")
          for r in regressions:
            worse = ">" if report.lower_is_better(r["metric"]) else "<"
            print(f"  step {r['step']}: {r['metric']} {r['value']:.4f} {worse} best {r['best']:.4f} "
                  f"(step {r['best_step']}, {r['drop']:.1%} {'higher' if worse == '>' else 'lower'})")
          code = EXIT_REGRESSION
        print(f"report: {out / 'report.md'}")
      if evaluated:
        last_new = time.monotonic()
      if not (watch and poll_seconds > 0) or time.monotonic() - last_new > idle_timeout:
        break
      time.sleep(poll_seconds)
  finally:
    ckpt.close()
  if not watch and not (out.exists() and any(out.glob("step_*.json"))):
    return EXIT_NOTHING
  print(report.comparison_table(out))
  if watch and evaluator is None and not available:
    print(f"no checkpoints in {ckpt.directory}")
    return EXIT_NOTHING
  return code
