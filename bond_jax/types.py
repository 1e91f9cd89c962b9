"""Types shared by every layer; this module imports nothing from bond_jax.

Shape suffixes name array axes throughout the package (`logp_BxG`): B rows
(prompts, or samples when a prompt has several), P prompt length, G generated
length, T = P + G, V vocabulary, D model width, N/K anchor samples per prompt,
M policy samples per prompt. A bare `_B` is one value per row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

# A pytree of arrays: model parameters, optimizer state, a TrainState.
PyTree = Any

# reward_fn(reward_params, prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG)
#   -> reward_B (float32). reward_params (a reward model's frozen weights, or None) are an
# argument, so they are never baked into a compiled step as constants.
RewardFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class ConfigError(ValueError):
  """A config value is out of range, inconsistent, or names a missing file."""


class PromptSource(Protocol):
  """A stream of prompt batches with a position that checkpoints carry."""

  def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the next global batch: (prompt_BxP, prompt_valid_BxP)."""
    ...

  def state(self) -> dict[str, Any]:
    """The position, as JSON, saved with each checkpoint."""
    ...

  def restore(self, state: dict[str, Any]) -> None:
    """Continue from a position returned by `state`."""
    ...


class _ParameterFree:
  """Calls fn(*batch), ignoring reward_params. Equal to another wrapper of an equal
  function: a bound method of equal objects (a task dataclass) counts as equal."""

  def __init__(self, fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]):
    self.fn = fn

  def __call__(self, reward_params: PyTree, *batch: jax.Array) -> jax.Array:
    del reward_params
    return self.fn(*batch)

  def _key(self) -> tuple:
    fn = self.fn
    return (fn.__self__, fn.__func__) if inspect.ismethod(fn) else (fn,)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, _ParameterFree):
      return False
    try:
      return bool(self._key() == other._key())
    except (TypeError, ValueError):  # owners that do not compare (arrays): identity only
      return self.fn is other.fn

  def __hash__(self) -> int:
    try:
      return hash(self._key())
    except TypeError:  # an unhashable owner (e.g. one holding arrays): identity only
      return id(self.fn)


def parameter_free(
  fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
) -> RewardFn:
  """A RewardFn from a reward of (prompt, valid, response, mask) that has no parameters.

  Two wrappers of equal functions are equal (and hash alike), so a reward rebuilt from the
  same config (e.g. each evaluation of a workdir) reuses compiled programs that take it as
  a static argument.
  """
  return _ParameterFree(fn)
