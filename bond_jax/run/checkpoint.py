"""Orbax checkpoints of the whole TrainState: policy, anchor, reference, optimizer, step, RNG.

The prompt stream's position rides along as the checkpoint's JSON metadata.
Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoint as the latest one: a
checkpoint is whole or it is not listed.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
from orbax.checkpoint import v1 as ocp


class Checkpoints:
  """Saves every `every` steps (and when forced), keeps the latest `keep`."""

  def __init__(self, directory: str | pathlib.Path, every: int, keep: int):
    self._ckpt = ocp.training.Checkpointer(
      pathlib.Path(directory).absolute(),
      save_decision_policy=ocp.training.save_decision_policies.FixedIntervalPolicy(every),
      preservation_policy=ocp.training.preservation_policies.LatestN(keep),
    )

  @property
  def latest_step(self) -> int | None:
    latest = self._ckpt.latest
    return None if latest is None else int(latest.step)

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, data position) of the latest checkpoint, or None if there is none.

    The state is loaded into `abstract_state`'s structure, dtypes and shardings.
    """
    latest = self._ckpt.latest
    if latest is None:
      return None
    state = self._ckpt.load(latest, abstract_state)
    custom = self._ckpt.metadata(latest).custom_metadata or {}
    return state, custom.get('data_position', {})

  def save(
    self, step: int, state: Any, *, force: bool = False, data_position: dict[str, Any] | None = None
  ) -> bool:
    """Save if the policy says so (or `force`). `data_position` (JSON) is stored in the
    same checkpoint's metadata, so state and prompt position are saved together."""
    if force and self.latest_step == step:
      return False  # already on disk
    return self._ckpt.save(
      step, state, force=force, custom_metadata={'data_position': data_position or {}}
    )

  def close(self) -> None:
    self._ckpt.close()


def with_sharding(abstract_state: Any, sharding: Any) -> Any:
  """Attach a sharding (one for all leaves, or a matching pytree) to an abstract state."""
  if not isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, sharding
    )
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state
  )
