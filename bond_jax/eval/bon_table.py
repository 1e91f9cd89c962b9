"""The BOND table: reward of pi_ref, of Best-of-N of pi_ref, and of the trained policy.

All on the same held-out prompts and the same reward. The trainer samples at
temperature 1 with no truncation (the models' own distributions), whatever the
training sampler used. Best-of-N rewards use the unbiased order-statistics
estimator over K >= N samples per prompt (`bon.bon_expected_max`), not one noisy
draw of N. The estimators are those of `estimates.py`, shared with the reproductions.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from bond_jax.eval import estimates
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree, RewardFn

_score = jax.jit(estimates.score_samples, static_argnames=('cfg', 'sp', 'per_prompt', 'reward_fn'))


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
  kl_n: int | None = None,
) -> dict[str, Any]:
  """Rewards of pi_ref, of Best-of-N(pi_ref) and of the policy, and the policy's section 8
  metrics against pi_ref (`estimates.policy_metrics`; the KLs to pi_BoN for `kl_n`)."""
  rng_ref, rng_policy = jax.random.split(rng)
  score = lambda sample_params, rng, per_prompt: _score(
    cfg=cfg, sample_params=sample_params, policy_params=policy_params, ref_params=ref_params,
    prompt_BxP=prompt_BxP, prompt_valid_BxP=valid_BxP, rng=rng, sp=sp, per_prompt=per_prompt,
    reward_fn=reward_fn, reward_params=reward_params,
  )  # fmt: skip
  ref = score(ref_params, rng_ref, samples_per_prompt)
  policy = score(policy_params, rng_policy, policy_samples_per_prompt)
  reference = jax.device_get(estimates.reference_metrics(ref, tuple(bon_ns)))
  metrics = jax.device_get(estimates.policy_metrics(policy, ref, kl_n))
  table = {
    'num_prompts': int(prompt_BxP.shape[0]),
    'reward_ref': float(reference['reward_ref']),
    'reward_bon': {str(n): float(reference[f'reward_bon_{n}']) for n in bon_ns},
    # KL(BoN_N || pi_ref) <= log N - (N - 1) / N, with equality for continuous rewards.
    'kl_bon_bound': {str(n): math.log(n) - (n - 1) / n for n in bon_ns},
    'reward_policy': float(metrics['reward']),
    'reward_policy_stderr': float(metrics['reward_stderr']),
    'kl_policy_ref': float(metrics['kl_ref']),
    'log_quantile': float(metrics['log_quantile']),
    'win_rate': float(metrics['win_rate']),
  }
  if kl_n is not None:
    table.update(kl_n=kl_n, kl_bwd=float(metrics['kl_bwd']), kl_fwd=float(metrics['kl_fwd']))
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
  versus = (
    f'Against pi_ref samples: win rate {table["win_rate"]:.3f}, '
    f'mean log quantile {table["log_quantile"]:.3f}'
  )
  if 'kl_n' in table:
    n = table['kl_n']
    versus += f', KL(pi || BoN-{n}) {table["kl_bwd"]:.3f}, KL(BoN-{n} || pi) {table["kl_fwd"]:.3f}'
  return '\n'.join(lines + [verdict, versus + '.'])
