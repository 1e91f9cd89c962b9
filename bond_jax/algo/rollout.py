"""Rollout phases of a train step: sample the policy and the anchor, score the samples, and
read the frozen models' log-likelihoods of the policy samples. No gradient flows here.

Rows are prompt-major: row b * S + j is sample j of prompt b when a prompt has S samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from bond_jax.algo import objectives
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree, RewardFn


@struct.dataclass
class Rows:
  """Responses with their prompts, one row each: what a log-likelihood or a reward reads."""

  prompt_BxP: jax.Array
  prompt_valid_BxP: jax.Array
  tokens_BxG: jax.Array
  mask_BxG: jax.Array

  def concat(self, other: Rows) -> Rows:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), self, other)


@struct.dataclass
class Rollout:
  """The samples of one step and what the frozen models say about them.

  policy: M samples per prompt [B*M rows]; anchor: A samples per prompt [B*A rows],
  or None when the algorithm draws none (REINFORCE).
  """

  policy: Rows
  policy_reward_B: jax.Array  # r(y) of each policy row
  logp_ref_B: jax.Array  # log pi_ref(y) of each policy row (sequence sums)
  anchor: Rows | None = None
  anchor_reward_BxA: jax.Array | None = None
  logp_anchor_B: jax.Array | None = None  # log pi_anchor(y) of each policy row
  num_prompts: int = struct.field(pytree_node=False, default=0)
  policy_per_prompt: int = struct.field(pytree_node=False, default=1)


def _repeat(x: jax.Array, times: int) -> jax.Array:
  return x if times == 1 else jnp.repeat(x, times, axis=0)


def draw(
  model: model_lib.ModelConfig,
  sp: sampling.SamplingParams,
  reward_fn: RewardFn,
  reward_params: PyTree,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  rng: jax.Array,
  per_prompt: int,
) -> tuple[Rows, jax.Array]:
  """`per_prompt` samples of each prompt from `params` (one shared prefill), and their rewards."""
  out = sampling.sample(model, params, prompt_BxP, prompt_valid_BxP, rng, sp, per_prompt)
  rows = Rows(
    _repeat(prompt_BxP, per_prompt),
    _repeat(prompt_valid_BxP, per_prompt),
    out.tokens_BxG,
    out.mask_BxG,
  )
  reward_B = reward_fn(
    reward_params, rows.prompt_BxP, rows.prompt_valid_BxP, rows.tokens_BxG, rows.mask_BxG
  )
  return rows, reward_B


def sequence_logp(model: model_lib.ModelConfig, params: PyTree, rows: Rows) -> jax.Array:
  """log pi(y | x) of each row, summed over its generated tokens only."""
  return sampling.sequence_logprobs(
    model, params, rows.prompt_BxP, rows.prompt_valid_BxP, rows.tokens_BxG, rows.mask_BxG
  ).sum(-1)


def best_of(rows: Rows, rewards_BxA: jax.Array, n: int) -> Rows:
  """The best of the first n samples of each prompt (ties: the lowest index), one row each."""
  num_prompts, per_prompt = rewards_BxA.shape
  best_B = objectives.best_of(rewards_BxA[:, :n])
  pick = lambda x: x.reshape(num_prompts, per_prompt, *x.shape[1:])[jnp.arange(num_prompts), best_B]
  return jax.tree.map(pick, rows)
