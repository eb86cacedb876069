"""`mm1-eval`: evaluate saved checkpoints of a run (gin-configured entry point)."""

from __future__ import annotations

from pathlib import Path

import jax

from mm1_jax import sharding as sharding_lib
from mm1_jax.eval import fewshot, report
from mm1_jax.model import MM1, MM1Config


def evaluate(*, workdir: str, model: MM1Config = MM1Config(),
             evaluation: fewshot.FewShotConfig = fewshot.FewShotConfig(),
             mesh: sharding_lib.MeshConfig = sharding_lib.MeshConfig(),
             checkpoint_dir: str | None = None, steps: str = "latest", force: bool = False) -> int:
  """Evaluates checkpoints and writes <workdir>/eval/step_<N>.json for each.

  Args:
    workdir: run directory; results go to its eval/ folder.
    model, evaluation, mesh: as for training.
    checkpoint_dir: default <workdir>/checkpoints.
    steps: 'latest', 'all', or comma-separated step numbers.
    force: re-evaluate steps that already have results.
  Returns:
    0, or 2 when there is nothing to evaluate.
  """
  from mm1_jax.checkpoint import Checkpointer  # noqa: PLC0415
  from mm1_jax.train import dummy_batch, init_param_shardings  # noqa: PLC0415

  ckpt = Checkpointer(checkpoint_dir or Path(workdir) / "checkpoints")
  available = ckpt.all_steps()
  if not available:
    print(f"no checkpoints in {ckpt.directory}")
    return 2
  if steps == "latest":
    wanted = [available[-1]]
  elif steps == "all":
    wanted = available
  else:
    wanted = [int(s) for s in steps.split(",")]
    missing = sorted(set(wanted) - set(available))
    if missing:
      raise SystemExit(f"steps {missing} not in {ckpt.directory} (have {available})")

  device_mesh = sharding_lib.make_mesh(mesh)
  mm1 = MM1(model)
  example = dummy_batch(1, 8, 1, model)
  abstract, shardings = init_param_shardings(mm1, example, device_mesh, mesh.rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  evaluator = fewshot.Evaluator(evaluation, mm1, device_mesh, mesh.rules)
  out = Path(workdir) / "eval"
  for step in wanted:
    if not force and (out / f"step_{step}.json").exists():
      print(f"step {step}: already evaluated ({out / f'step_{step}.json'})")
      continue
    params = ckpt.restore_params(step, target)
    evaluator.evaluate_and_write(params, step, workdir)
    del params
  ckpt.close()
  print(report.comparison_table(out))
  return 0

