"""Imports of the always-loaded libraries stand at the top of their module.

Every command starts through `mm1_jax.console`, which settles the JAX platform before the
command's module is imported, so no module needs to put off importing jax until a function
runs. jax, flax, optax, numpy, gin and orbax are loaded by every command anyway: an import
of one of them inside a function only hides a dependency. Imports inside functions remain
for packages that some commands never load (tensorflow, seqio, transformers, torch, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mm1_jax"
ALWAYS_LOADED = {"jax", "flax", "optax", "numpy", "gin", "orbax"}


def _imported_packages(node: ast.Import | ast.ImportFrom) -> set[str]:
  """Top-level package names an import statement loads (relative imports: none)."""
  if isinstance(node, ast.ImportFrom):
    return set() if node.level else {(node.module or "").split(".")[0]}
  return {alias.name.split(".")[0] for alias in node.names}


def local_imports(tree: ast.AST, packages: set[str]) -> list[tuple[int, str]]:
  """(line, package) of each import of one of `packages` inside a function (at any depth)."""
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
      found.extend((node.lineno, p) for p in sorted(_imported_packages(node) & packages))
    inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inside)

  visit(tree, False)
  return found


def test_always_loaded_libraries_are_imported_at_module_top():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for line, package in local_imports(ast.parse(path.read_text(), str(path)), ALWAYS_LOADED):
      found.append(f"{path.relative_to(REPO)}:{line}: import of {package} inside a function")
  assert not found, ("move these imports to the top of their module (the platform is set by "
                     "mm1_jax.console before any command module loads):\n" + "\n".join(found))
