"""Checkpoints with orbax: the train state plus the data position, saved asynchronously.

Layout: <workdir>/checkpoints/<step>/{state,data}. `data` is a small JSON record of
how many batches the run has consumed and the grain loader's state, so a resumed run
continues the same data stream instead of starting it over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `save_every` steps (and on demand), keeps the newest `max_to_keep`."""

  def __init__(self, directory: str | Path, *, save_every: int = 100, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def reload(self) -> None:
    """Re-reads the directory: steps another process (a training run) wrote since."""
    self._manager.reload()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts a save (async); returns whether one was started."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
