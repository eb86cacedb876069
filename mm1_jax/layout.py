"""Parameter layouts: the PartitionSpec of every parameter of a model on a mesh.

Nothing is allocated (jax.eval_shape) and no devices are needed: the mesh is only a
shape. tests/golden/sharding/ holds the layout of each preset on a few meshes; a test
fails on any change, so a change of rules or model structure is reviewed as a diff.

  python -m mm1_jax layout --write      # regenerate the golden files after an intended change
  python -m mm1_jax layout --gin_file=gin/models/mm1_7b.gin --mesh=data=2,fsdp=16,tensor=4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from mm1_jax import gin_checks, gin_cli, sharding
from mm1_jax import gin_files as gin_files_lib
from mm1_jax.model import MM1

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden" / "sharding"

# (model gin file, mesh name, {axis: size}): the layouts kept as golden files.
GOLDEN = (
    ("mm1_tiny", "d2_f2_t2", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("mm1_3b", "f64", {"fsdp": 64}),
    ("mm1_3b", "d2_f16_t4", {"data": 2, "fsdp": 16, "tensor": 4}),
    ("mm1_7b", "f128", {"fsdp": 128}),
    ("mm1_7b", "d2_f16_t4", {"data": 2, "fsdp": 16, "tensor": 4}),
    ("mm1_30b", "f256", {"fsdp": 256}),
    ("mm1_30b", "d4_f16_t4", {"data": 4, "fsdp": 16, "tensor": 4}),
    ("mm1_3b_moe", "f32_e8", {"fsdp": 32, "expert": 8}),
    ("mm1_3b_moe", "d2_f8_t4_e4", {"data": 2, "fsdp": 8, "tensor": 4, "expert": 4}),
    ("mm1_7b_moe", "f32_e8", {"fsdp": 32, "expert": 8}),
)


def layout(model_config, mesh_shape: dict[str, int], rules) -> list[tuple[str, tuple, str, str]]:
  """[(parameter path, shape, PartitionSpec, note)] in path order."""
  s = model_config.encoder.image_size
  tok = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  img = jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.uint8)
  with nn.logical_axis_rules(list(rules)):
    boxed = jax.eval_shape(MM1(model_config).init, jax.random.PRNGKey(0), tok, img, tok, tok)["params"]
  full = {a: mesh_shape.get(a, 1) for a in sharding.MESH_AXES}
  rows = []
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    spec, notes = sharding.resolve_spec(value.shape, names, rules, full)
    rows.append((name, tuple(value.shape), str(spec), "; ".join(notes)))
  return sorted(rows)


def format_layout(rows) -> str:
  w = max(len(r[0]) for r in rows)
  return "\n".join(f"{p.ljust(w)}  {'x'.join(map(str, shape)) or 'scalar':>22}  {spec}"
                   + (f"  # unsharded: {note}" if note else "") for p, shape, spec, note in rows) + "\n"


def _config_and_rules(gin_files: list[str], bindings: list[str] = (), search_paths: list[str] = ()):
  gin.clear_config(clear_constants=True)
  for path in (*search_paths, *gin_files_lib.search_paths()):
    gin.add_config_file_search_path(path)
  try:
    # The run file's required macros, which a layout does not depend on.
    gin.parse_config_files_and_bindings(
        ["gin/runs/pretrain.gin", *gin_files],
        ["TRAIN_STEPS = 1", "BATCH_SIZE = 1", "MIXTURE_OR_TASK_NAME = 'none'", *bindings])
    gin_checks.check_macros_read(bindings, read_by_command=("MODEL", "MESH"))
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    mesh = gin.query_parameter("%MESH").scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)
  return model, mesh.rules if isinstance(mesh, sharding.MeshConfig) else sharding.MeshConfig().rules


def golden_text(model_name: str, mesh_shape: dict[str, int]) -> str:
  model, rules = _config_and_rules([f"gin/models/{model_name}.gin"])
  mesh = ", ".join(f"{k}={v}" for k, v in mesh_shape.items())
  header = (f"# {model_name} on mesh {mesh}, rules of gin/runs/pretrain.gin (mm1_jax/sharding.py's)\n"
            f"# regenerate after an intended change: python -m mm1_jax.layout --write\n")
  return header + format_layout(layout(model, mesh_shape, rules))


def golden_path(model_name: str, mesh_name: str) -> Path:
  return GOLDEN_DIR / f"{model_name}.{mesh_name}.txt"


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  p = argparse.ArgumentParser(prog="python -m mm1_jax layout", description=__doc__)
  gin_cli.add_gin_flags(p, required=False, example="gin/models/mm1_7b.gin (with the run's rules)")
  p.add_argument("--mesh", default="fsdp=8", help="axis sizes, e.g. data=2,fsdp=16,tensor=4")
  p.add_argument("--write", action="store_true", help="rewrite every golden file")
  args = p.parse_args(rest)
  if args.write:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for model_name, mesh_name, shape in GOLDEN:
      golden_path(model_name, mesh_name).write_text(golden_text(model_name, shape))
      print(f"wrote {golden_path(model_name, mesh_name)}")
    return 0
  if not args.gin_file:
    p.error("give model gin files, or --write")
  shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  gin_cli.import_modules(args.module_import)
  try:
    model, rules = _config_and_rules(args.gin_file, bindings, gin_cli.search_paths(args))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(format_layout(layout(model, shape, rules)))
  return 0


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("layout"))
