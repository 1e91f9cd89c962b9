"""Types shared by every layer; this module imports nothing from bond_jax.

Shape suffixes name array axes throughout the package (`logp_BxG`): B rows
(prompts, or samples when a prompt has several), P prompt length, G generated
length, T = P + G, V vocabulary, D model width, N/K anchor samples per prompt,
M policy samples per prompt. A bare `_B` is one value per row.
"""

from __future__ import annotations

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


def parameter_free(
  fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
) -> RewardFn:
  """A RewardFn from a reward of (prompt, valid, response, mask) that has no parameters."""
  return lambda reward_params, *batch: fn(*batch)
