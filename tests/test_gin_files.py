"""The gin files ship with the package and resolve from any working directory."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mm1_jax import gin_files

REPO = Path(__file__).resolve().parent.parent


def test_root_in_a_checkout_is_the_checkout():
  assert gin_files.root() == REPO
  assert (gin_files.root() / "gin" / "experiments" / "quickstart.gin").is_file()


def test_search_paths_are_cwd_root_then_extras_without_repeats(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert gin_files.search_paths(["/a", Path("/b"), "/a"]) == [os.getcwd(), str(REPO), "/a", "/b"]
  monkeypatch.chdir(REPO)
  assert gin_files.search_paths() == [str(REPO)]


@pytest.mark.slow
def test_installed_package_carries_the_gin_files(tmp_path):
  """Installs the package (no dependencies) into a folder and, from another folder, finds
  and parses shipped gin files through `gin_files` alone."""
  src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  src.mkdir()
  for name in ("setup.py", "README.md"):
    if (REPO / name).is_file():
      shutil.copy(REPO / name, src / name)
  for name in ("mm1_jax", "tasks", "gin"):
    shutil.copytree(REPO / name, src / name, ignore=ignore)
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                         "--no-index", "--quiet", "--target", str(site), str(src)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (site / "mm1_jax" / "gin" / "experiments" / "quickstart.gin").is_file()
  assert not (site / "gin").exists()  # inside the package, not a top-level folder

  elsewhere.mkdir()
  script = textwrap.dedent("""
      import sys
      from pathlib import Path

      import gin

      from mm1_jax import gin_files

      root = gin_files.root()
      assert Path(gin_files.__file__).is_relative_to(sys.argv[1]), gin_files.__file__
      assert root == Path(sys.argv[1]) / "mm1_jax", root
      assert (root / "gin" / "experiments" / "quickstart.gin").is_file()
      for path in gin_files.search_paths():
        gin.add_config_file_search_path(path)
      # mm1_3b.gin includes gin/models/mm1_base.gin, which includes an encoder file.
      gin.parse_config_files_and_bindings([str(root / "gin" / "models" / "mm1_3b.gin")], [])
      assert gin.query_parameter("decoder.DecoderConfig.width") == 3072
      assert gin.query_parameter("vit.ViTConfig.image_size") == 378
      print("ok", root)
  """)
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script, str(site)], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert proc.stdout.strip() == f"ok {site / 'mm1_jax'}"
