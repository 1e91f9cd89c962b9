"""The BOND table: reward of pi_ref, of Best-of-N of pi_ref, and of the trained policy.

All on the same held-out prompts and the same reward. The trainer samples at
temperature 1 with no truncation (the models' own distributions), whatever the
training sampler used. Best-of-N rewards use the unbiased order-statistics
estimator over K >= N samples per prompt (`bon.bon_expected_max`), not one noisy
draw of N.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax.algo import bon
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree, RewardFn


def _rewards_and_logps(
  cfg: model_lib.ModelConfig,
  params: PyTree,
  ref_params: PyTree,
  prompt_BxP: jax.Array,
  valid_BxP: jax.Array,
  rng: jax.Array,
  sp: sampling.SamplingParams,
  per_prompt: int,
  reward_fn: RewardFn,
  reward_params: PyTree,
  with_kl: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
  out = sampling.sample_jit(cfg, params, prompt_BxP, valid_BxP, rng, sp, num_samples=per_prompt)
  prompt = jnp.repeat(prompt_BxP, per_prompt, axis=0)
  valid = jnp.repeat(valid_BxP, per_prompt, axis=0)
  reward = jax.jit(reward_fn)(reward_params, prompt, valid, out.tokens_BxG, out.mask_BxG)
  kl = None
  if with_kl:
    logp = jax.jit(sampling.sequence_logprobs, static_argnums=0)
    logp_pi = logp(cfg, params, prompt, valid, out.tokens_BxG, out.mask_BxG).sum(-1)
    logp_ref = logp(cfg, ref_params, prompt, valid, out.tokens_BxG, out.mask_BxG).sum(-1)
    kl = np.asarray(logp_pi - logp_ref)
  return np.asarray(reward).reshape(-1, per_prompt), kl


def bon_table(
  cfg: model_lib.ModelConfig,
  ref_params: PyTree,
  policy_params: PyTree,
  prompt_BxP: jax.Array,
  valid_BxP: jax.Array,
  reward_fn: RewardFn,
  reward_params: PyTree,
  rng: jax.Array,
  sp: sampling.SamplingParams,
  *,
  samples_per_prompt: int,
  bon_ns: tuple[int, ...],
  policy_samples_per_prompt: int,
) -> dict[str, Any]:
  """Mean rewards of pi_ref, Best-of-N(pi_ref) and the policy, and the policy's KL."""
  rng_ref, rng_policy = jax.random.split(rng)
  ref_rewards_BxK, _ = _rewards_and_logps(
    cfg,
    ref_params,
    ref_params,
    prompt_BxP,
    valid_BxP,
    rng_ref,
    sp,
    samples_per_prompt,
    reward_fn,
    reward_params,
    with_kl=False,
  )
  policy_rewards_BxM, policy_kl_B = _rewards_and_logps(
    cfg,
    policy_params,
    ref_params,
    prompt_BxP,
    valid_BxP,
    rng_policy,
    sp,
    policy_samples_per_prompt,
    reward_fn,
    reward_params,
    with_kl=True,
  )
  table = {
    'num_prompts': int(prompt_BxP.shape[0]),
    'reward_ref': float(ref_rewards_BxK.mean()),
    'reward_bon': {
      str(n): float(np.mean(bon.bon_expected_max(jnp.asarray(ref_rewards_BxK), n))) for n in bon_ns
    },
    # KL(BoN_N || pi_ref) <= log N - (N - 1) / N, with equality for continuous rewards.
    'kl_bon_bound': {str(n): math.log(n) - (n - 1) / n for n in bon_ns},
    'reward_policy': float(policy_rewards_BxM.mean()),
    'reward_policy_stderr': float(
      policy_rewards_BxM.mean(axis=1).std() / math.sqrt(policy_rewards_BxM.shape[0])
    ),
    'kl_policy_ref': float(policy_kl_B.mean()),
  }
  beaten = [n for n in bon_ns if table['reward_policy'] >= table['reward_bon'][str(n)]]
  table['matches_bon_n'] = max(beaten) if beaten else 1
  return table


def format_table(table: dict[str, Any]) -> str:
  lines = [
    f'{"sampler":<22}{"mean reward":>12}{"KL to pi_ref":>16}',
    f'{"pi_ref":<22}{table["reward_ref"]:>12.3f}{0.0:>16.3f}',
  ]
  for n, r in table['reward_bon'].items():
    lines.append(
      f'{"Best-of-" + n + " of pi_ref":<22}{r:>12.3f}'
      f'{"<= " + format(table["kl_bon_bound"][n], ".3f"):>16}'
    )
  lines.append(
    f'{"trained policy":<22}{table["reward_policy"]:>12.3f}{table["kl_policy_ref"]:>16.3f}'
  )
  n = table['matches_bon_n']
  top = max(int(k) for k in table['reward_bon'])
  if n == top and table['reward_policy'] > table['reward_bon'][str(top)]:
    verdict = f'One sample of the trained policy beats Best-of-{n} of pi_ref.'
  elif n > 1:
    verdict = f'One sample of the trained policy matches Best-of-{n} of pi_ref.'
  else:
    verdict = 'The trained policy does not reach Best-of-2 of pi_ref.'
  return '\n'.join(lines + [verdict])
