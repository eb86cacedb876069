"""Checkpoints with orbax: the train state plus the data position, saved asynchronously.

Layout: <workdir>/checkpoints/<step>/{state,data}; the folder may be local or in a
bucket (gs://..., `mm1_jax.paths`). `data` is a small JSON record of
how many batches the run has consumed and the grain loader's state, so a resumed run
continues the same data stream instead of starting it over.

A step folder appears only once it is complete: in a local folder orbax writes into a
temporary folder and renames it when every item is written, so a process killed mid-save
leaves a temporary folder that readers never list (the training run deletes such
leftovers when it starts). A state holding NaN or Inf is refused before anything is written.

On a bucket (gs://) nothing can be renamed: orbax writes the step folder under its final
name and uploads `<step>/commit_success.txt` last, after every item (each with its own
marker) and the step's metadata; a step is listed (`all_steps`, `latest_step`) only when
that object exists. A save whose uploads fail past the clients' retries (the async write
raises on `wait`, `close` or the next `save`) therefore leaves a step folder without the
marker: no reader lists it, the previous checkpoints stay (old steps are deleted only after
a save completes), and this object re-reads the bucket so that its own `latest_step` names
the newest complete step again. A run started with `remove_partial=True` deletes such
unmarked folders before its first save (a saving run that resumes from the step before
writes the failed step afresh, none of the failed attempt's objects kept).
Transient errors (503s, dropped connections, delays) that the clients' retries cover leave
a checkpoint that restores bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mm1_jax import paths
from mm1_jax.paths import PathLike


class NonfiniteStateError(FloatingPointError):
  """A train state about to be saved holds NaN or Inf."""


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True), tree)


def nonfinite_paths(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or Inf."""
  flags = jax.device_get(_finite_leaves(tree))
  return [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(flags)
          if not bool(np.asarray(ok))]


class Checkpointer:
  """Saves every `save_every` steps (and on demand), keeps the newest `max_to_keep`."""

  def __init__(self, directory: PathLike, *, save_every: int = 100, max_to_keep: int = 3,
               async_save: bool = True, remove_partial: bool = False):
    """remove_partial: delete temporary folders left by a save that never finished. Only
    the process that writes checkpoints may do so (a reader would delete a save in flight)."""
    self.directory = paths.path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=remove_partial),
        item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def reload(self) -> None:
    """Re-reads the directory: steps another process (a training run) wrote since."""
    self._manager.reload()

  def _surfacing_failed_save(self, call, *args, **kwargs):
    """Runs a manager call that may raise the error of an async save that failed. The
    manager then drops the failed step from its list, but it already dropped the steps
    that save was to delete once complete (kept on storage, since it never completed):
    re-reading the directory lists the complete steps again before the error goes on."""
    try:
      return call(*args, **kwargs)
    except Exception:
      self._manager.reload()
      raise

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts a save (async) if one is due at `step` or `force`; returns whether it was.

    Raises NonfiniteStateError, writing nothing, when the state holds NaN or Inf; raises
    the error of a previous async save that failed (this save is then not started).
    """
    if not force and not self._manager.should_save(step):
      return False
    bad = nonfinite_paths(state)
    if bad:
      raise NonfiniteStateError(f"not saving checkpoint {step}: NaN/Inf in {', '.join(bad[:5])}"
                                + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return self._surfacing_failed_save(
        self._manager.save, step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """abstract_state: jax.ShapeDtypeStruct leaves carrying the target shardings."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {})

  def restore_data(self, step: int) -> dict:
    """The data record of a checkpoint alone (batches consumed, loader state)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return dict(restored["data"] or {})

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only `params` of a saved train state (evaluation needs no optimizer)."""
    item = {"params": abstract_params}
    reader = ocp.CheckpointManager(
        self.directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True))
    restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    reader.close()
    return restored["state"]["params"]

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises its error if it failed."""
    self._surfacing_failed_save(self._manager.wait_until_finished)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


# --- parameter trees outside a train state (imports, exports, init_from) ---------------

def save_params(tree: dict, directory: PathLike) -> None:
  """Writes a parameter tree as an orbax PyTree (what `mm1-convert import` makes)."""
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(paths.path(directory), tree, force=True)


def load_params(directory: PathLike) -> dict:
  """An imported DIR (DIR/params) or a run's checkpoints/ folder (newest step) -> params numpy tree."""
  directory = paths.path(directory)
  if (directory / "params").is_dir():
    return _restore_numpy(directory / "params")
  steps = Checkpointer(directory).all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory} has neither params/ (mm1-convert import) nor checkpoints")
  return load_checkpoint_params(directory, steps[-1])


def load_checkpoint_params(directory: PathLike, step: int) -> dict:
  return _restore_numpy(paths.path(directory) / str(step) / "state")["params"]


def _restore_numpy(path) -> dict:
  """Restores an orbax PyTree as host numpy arrays: no devices or saved topology needed."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, restore_args=args)
