"""The test tiers hold: `pytest -m "not slow"` runs no subprocess and no TPU compile, and
every test that can load libtpu carries the `libtpu` marker, which puts it on the one xdist
worker that runs such tests one after another.

The check is static: for each test it reads the test's code, its fixtures' and the helpers
and classes they use (in tests/), and looks for the ways a test starts a process or libtpu.
"""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Calls that start a process.
PROCESS_CALLS = {("subprocess", name) for name in ("run", "Popen", "call", "check_call", "check_output")} | {
    ("os", name) for name in ("system", "popen", "execv", "execve", "execvp", "spawnv", "spawnl")}
# Command-line words that run mm1-aot, which compiles for a TPU topology with libtpu.
AOT_WORDS = ("mm1_jax.aot", "mm1-aot", "benchmarks.preflight", "benchmarks/preflight.py")
# tpu_scripts that run the mm1-aot preflight gate unless told not to.
GATED_SCRIPTS = ("create.py", "launch.py", "supervise.py")
NO_GATE = ("--skip_preflight", "--dry_run", "--help")
# The benchmark suite, which runs mm1-aot unless it only renders or skips its preflight.
SUITE = ("benchmarks.run", "benchmarks/run.py")
NO_SUITE_PREFLIGHT = ("--render", "preflight")
# In-process entry points of libtpu.
LIBTPU_NAMES = {"topology_devices", "get_topology_desc", "topologies"}
LIBTPU_ATTRS = {("aot", "preflight"), ("aot", "main"), ("aot_lib", "preflight"), ("_pod", "preflight")}


def _marks(decorators) -> set[str]:
  """`pytest.mark.NAME` and `pytest.mark.NAME(...)` among decorators (or a pytestmark value)."""
  names = set()
  for d in decorators:
    if isinstance(d, ast.Call):
      d = d.func
    if isinstance(d, ast.Attribute) and isinstance(d.value, ast.Attribute) and d.value.attr == "mark":
      names.add(d.attr)
  return names


def _strings(node) -> list[str]:
  return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


class Module:
  """One test module's top-level functions, classes, imports from other test modules and marks."""

  def __init__(self, name: str, source: str):
    self.name = name
    self.tree = ast.parse(source)
    self.defs = {}  # name -> FunctionDef / ClassDef
    self.imports = {}  # name -> module name, for `from test_x import name`
    self.marks = set()  # pytestmark
    self.autouse = []
    for node in self.tree.body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        self.defs[node.name] = node
        if any(isinstance(d, ast.Call) and any(k.arg == "autouse" for k in d.keywords)
               for d in getattr(node, "decorator_list", [])):
          self.autouse.append(node.name)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
          node.module.startswith("test_") or node.module == "conftest"):
        self.imports.update({a.asname or a.name: node.module for a in node.names})
      elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in node.targets):
        value = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
        self.marks |= _marks(value)

  def tests(self):
    """(test function, its marks): module-level tests and the test methods of Test* classes."""
    out = []
    for n in self.tree.body:
      if isinstance(n, ast.FunctionDef) and n.name.startswith("test"):
        out.append((n, self.marks | _marks(n.decorator_list)))
      elif isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
        out += [(f, self.marks | _marks(n.decorator_list) | _marks(f.decorator_list)) for f in n.body
                if isinstance(f, ast.FunctionDef) and f.name.startswith("test")]
    return out


def _reach(modules: dict, module: str, root) -> list:
  """The test's own code and every function or class of tests/ it reaches: fixtures (by
  argument name, in the module or conftest.py), helpers, classes, autouse fixtures."""
  seen, out = set(), []
  todo = [(module, root)] + [(module, modules[module].defs[n]) for n in modules[module].autouse]
  if "conftest" in modules:
    todo += [("conftest", modules["conftest"].defs[n]) for n in modules["conftest"].autouse]
  while todo:
    where, node = todo.pop()
    if (where, node.name) in seen:
      continue
    seen.add((where, node.name))
    out.append(node)
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    for fn in [n for n in ast.walk(node) if isinstance(n, ast.FunctionDef)]:
      names |= {a.arg for a in fn.args.args + fn.args.kwonlyargs}  # fixtures
      for d in fn.decorator_list:  # @pytest.mark.usefixtures("name")
        if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "usefixtures":
          names |= set(_strings(d))
    for name in names:
      m = modules[where]
      if name in m.defs:
        todo.append((where, m.defs[name]))
      elif name in m.imports and m.imports[name] in modules and name in modules[m.imports[name]].defs:
        todo.append((m.imports[name], modules[m.imports[name]].defs[name]))
      elif "conftest" in modules and name in modules["conftest"].defs:
        todo.append(("conftest", modules["conftest"].defs[name]))
  return out


def _outer_calls(node):
  """The calls in `node` that are not arguments of another call: a command line and the
  calls that build its words are judged together."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, ast.Call):
      yield child
    else:
      yield from _outer_calls(child)


def _words(call, assigned: dict) -> list[str]:
  """The strings of a call, and of the local variables it passes (`args = [...]; run(*args)`)."""
  words = _strings(call)
  for n in ast.walk(call):
    if isinstance(n, ast.Name):
      words += assigned.get(n.id, [])
  return words


def _what_it_runs(nodes) -> tuple[str | None, str | None]:
  """(why it starts a process, why it can load libtpu), each None when it does not."""
  process = libtpu = None
  for node in nodes:
    for n in ast.walk(node):
      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and (n.value.id, n.attr) in LIBTPU_ATTRS:
        libtpu = libtpu or f"uses {n.value.id}.{n.attr} in {node.name}"
      name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None
      if name in LIBTPU_NAMES:
        libtpu = libtpu or f"uses {name} in {node.name}"
      if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) \
          and (n.func.value.id, n.func.attr) in PROCESS_CALLS:
        process = process or f"calls {n.func.value.id}.{n.func.attr} in {node.name}"
    assigned = {}
    for n in ast.walk(node):
      if isinstance(n, ast.Assign):
        for t in n.targets:
          if isinstance(t, ast.Name):
            assigned.setdefault(t.id, []).extend(_strings(n.value))
    for call in _outer_calls(node):
      words = _words(call, assigned)
      if any(w in s for s in words for w in AOT_WORDS):
        libtpu = libtpu or f"runs mm1-aot in {node.name}"
      if any(s.endswith(GATED_SCRIPTS) for s in words) and not any(s in NO_GATE for s in words):
        libtpu = libtpu or f"runs a tpu_scripts command with its preflight gate in {node.name}"
      if any(s in SUITE for s in words) and not any(s in NO_SUITE_PREFLIGHT for s in words):
        libtpu = libtpu or f"runs the benchmark suite with its preflight in {node.name}"
  return process, libtpu


def violations(sources: dict[str, str]) -> list[str]:
  """For test modules {file name: source} (and conftest.py), the tests that start a process
  without the `slow` marker, or can load libtpu without the `libtpu` and `slow` markers."""
  modules = {Path(name).stem: Module(Path(name).stem, src) for name, src in sources.items()}
  problems = []
  for name, m in sorted(modules.items()):
    for test, marks in m.tests():
      process, libtpu = _what_it_runs(_reach(modules, name, test))
      where = f"tests/{name}.py::{test.name}"
      if (process or libtpu) and "slow" not in marks:
        problems.append(f"{where}: {process or libtpu}, but is not marked slow")
      if libtpu and "libtpu" not in marks:
        problems.append(f"{where}: {libtpu}, but is not marked libtpu")
  return problems


def test_tests_that_start_processes_or_libtpu_carry_their_markers():
  """Catches a test that starts a subprocess in the fast tier (`-m "not slow"`), or one
  that starts libtpu (mm1-aot, a tpu_scripts preflight gate, the benchmark suite's
  preflight) beside another libtpu user on the other xdist worker."""
  sources = {p.name: p.read_text() for p in sorted(TESTS.glob("*.py"))}
  problems = violations(sources)
  assert not problems, "\n".join(problems)


BAD = '''
import subprocess, sys
import pytest

SCRIPTS = "tpu_scripts"


class Runner:
  def run(self, *args):
    return subprocess.run([sys.executable, *args])


@pytest.fixture
def runner():
  return Runner()


def _aot(*flags):
  return subprocess.run([sys.executable, "-m", "mm1_jax.aot", *flags])


def test_unit():
  assert 1 + 1 == 2


def test_process(runner):
  runner.run("--version")


@pytest.mark.slow
def test_aot_in_a_helper():
  _aot("--topology=v5p-8")


@pytest.mark.slow
def test_gate(runner):
  runner.run(f"{SCRIPTS}/launch.py", "--name=x")


@pytest.mark.slow
@pytest.mark.libtpu
def test_marked(runner):
  runner.run("create.py", "--name=x")


@pytest.mark.slow
class TestInAClass:
  def test_method(self):
    _aot("--topology=v5p-8")


@pytest.mark.slow
def test_gate_skipped(runner):
  runner.run("launch.py", "--skip_preflight")


@pytest.mark.slow
def test_suite(runner):
  runner.run("-m", "benchmarks.run", "--short")


@pytest.mark.slow
def test_suite_render(runner):
  runner.run("-m", "benchmarks.run", "--render")


def test_in_process():
  from mm1_jax import aot
  aot.topology_devices(aot.parse_topology("v5p-8"))
'''


def test_the_tier_check_finds_each_kind_of_unmarked_test():
  """Catches a tier check that passes everything: each way of starting a process or
  libtpu, reached through a fixture, a helper or a class, is reported when unmarked."""
  found = violations({"test_bad.py": BAD})
  tests = {p.split("::")[1].split(":")[0] for p in found}
  assert tests == {"test_process", "test_aot_in_a_helper", "test_gate", "test_suite", "test_in_process",
                   "test_method"}, found
  assert sum("not marked slow" in p for p in found) == 2  # test_process, test_in_process
  assert not violations({"test_good.py": "import pytest\npytestmark = [pytest.mark.slow, pytest.mark.libtpu]\n"
                                         + BAD.split("import pytest", 1)[1]})


@pytest.mark.libtpu
def test_libtpu_tests_share_one_xdist_worker(request):
  """Catches a `libtpu` marker that does not become the xdist group (for instance a
  collection hook that runs after xdist has read the groups): under --dist loadgroup the
  test's node id carries the group."""
  assert request.node.get_closest_marker("xdist_group").args == ("libtpu",)
  if getattr(request.config.option, "loadgroup", False) and hasattr(request.config, "workerinput"):
    assert request.node.nodeid.endswith("@libtpu"), request.node.nodeid
