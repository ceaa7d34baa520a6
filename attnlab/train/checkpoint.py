"""Orbax checkpoints of the train state: periodic saves, keep-last-N, restore on restart."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx


class Checkpointer:
  """Saves the (sharded) train state every ``every`` steps under ``directory`` and keeps
  the last ``keep`` checkpoints; ``restore_latest`` brings the newest back with the
  shardings of a template state."""

  def __init__(self, directory, *, every: int, keep: int):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint every and keep must be >= 1, got every={every}, "
                       f"keep={keep}")
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           create=True)
    self.manager = ocp.CheckpointManager(pathlib.Path(directory).resolve(),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: nnx.State, *, force: bool = False) -> bool:
    """Save ``state`` if ``step`` is on the period (or ``force``); True if saved."""
    pure = state.to_pure_dict()
    return bool(self.manager.save(step, args=ocp.args.StandardSave(pure), force=force))

  def restore_latest(self, template: nnx.State):
    """``(step, state)`` of the newest checkpoint, laid out like ``template`` (same
    shardings), or ``(0, template)`` if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return 0, template
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.to_pure_dict())
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    state = jax.tree.map(lambda x: x, template)  # a copy to fill
    nnx.replace_by_pure_dict(state, restored)
    return step, state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
