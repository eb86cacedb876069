"""Where the shipped gin files are, so that `gin/...` names resolve from any folder.

The gin/ tree travels with the package (setup.py maps it to the package `mm1_jax.gin`).
In a checkout, and in an editable install of one, it is the checkout's own gin/ folder;
in an installed wheel it is `mm1_jax/gin/` in site-packages. `root()` is the folder that
holds `gin/` in either case, so the names used everywhere (`gin/experiments/...`, and
the `include "gin/..."` lines of the files themselves) resolve against it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

_PACKAGE = Path(__file__).resolve().parent


def root() -> Path:
  """The folder that contains the shipped `gin/` tree."""
  for candidate in (_PACKAGE.parent, _PACKAGE):  # a checkout (or editable install), a wheel
    if (candidate / "gin" / "runs" / "pretrain.gin").is_file():  # not gin-config's own `gin` package
      return candidate
  raise FileNotFoundError(f"no gin/ folder beside or inside {_PACKAGE}: the package was installed "
                          "without its gin files")


def search_paths(extra: Iterable[str | os.PathLike] = ()) -> list[str]:
  """Folders gin files and their includes are looked up in, in order: the working
  directory, `root()`, then `extra` (e.g. --gin_search_paths); without repeats."""
  paths = [os.getcwd(), str(root()), *(str(p) for p in extra)]
  return list(dict.fromkeys(paths))
