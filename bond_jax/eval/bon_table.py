"""The BOND table: reward of pi_ref, of Best-of-N of pi_ref, and of the trained policy.

All on the same held-out prompts and the same reward. The trainer samples at
temperature 1 with no truncation (the models' own distributions), whatever the
training sampler used. Best-of-N rewards use the unbiased order-statistics
estimator over K >= N samples per prompt (`bon.bon_expected_max`), not one noisy
draw of N. The estimators are those of `estimates.py`, shared with the reproductions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from bond_jax.eval import estimates
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree, RewardFn

_score = jax.jit(
  estimates.score_samples,
  static_argnames=('cfg', 'sp', 'per_prompt', 'reward_fn', 'sampled_by', 'micro_batch', 'chunk'),
)


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
  examples: int = 0,
  micro_batch: int = 0,
  chunk: int = 0,
) -> dict[str, Any]:
  """Rewards of pi_ref, of Best-of-N(pi_ref) and of the policy, and the policy's section 8
  metrics against pi_ref (`estimates.policy_metrics`; the KLs to pi_BoN for `kl_n`).

  examples: for the first `examples` prompts, the first sample of pi_ref and of the policy
  with their rewards, as token ids (table['examples']; `with_text` decodes them).
  micro_batch, chunk: prompts sampled and scored at a time, response positions turned into
  logits at a time (0: all; the same table either way, `estimates.score_samples`)."""
  rng_ref, rng_policy = jax.random.split(rng)
  # Each model's log-likelihoods of its own samples come from the sampler (`sp` draws from
  # the models themselves); the other model reads them.
  score = lambda sample_params, rng, per_prompt, sampled_by: _score(
    cfg=cfg, sample_params=sample_params, policy_params=policy_params, ref_params=ref_params,
    prompt_BxP=prompt_BxP, prompt_valid_BxP=valid_BxP, rng=rng, sp=sp, per_prompt=per_prompt,
    reward_fn=reward_fn, reward_params=reward_params, sampled_by=sampled_by,
    micro_batch=micro_batch, chunk=chunk,
  )  # fmt: skip
  ref = score(ref_params, rng_ref, samples_per_prompt, 'ref')
  policy = score(policy_params, rng_policy, policy_samples_per_prompt, 'policy')
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
    'nll_ref_per_token_policy': float(metrics['nll_ref_per_token']),
    'nll_ref_per_token_ref': float(reference['nll_ref_per_token']),
  }
  if kl_n is not None:
    table.update(kl_n=kl_n, kl_bwd=float(metrics['kl_bwd']), kl_fwd=float(metrics['kl_fwd']))
  beaten = [n for n in bon_ns if table['reward_policy'] >= table['reward_bon'][str(n)]]
  table['matches_bon_n'] = max(beaten) if beaten else 1
  if examples:
    table['examples'] = _examples(prompt_BxP, valid_BxP, ref, policy, examples)
  return table


def _ids(tokens_G: Any, mask_G: Any) -> list[int]:
  return [int(t) for t, m in zip(tokens_G, mask_G, strict=True) if m]


def _examples(
  prompt_BxP: Any, valid_BxP: Any, ref: estimates.Scores, policy: estimates.Scores, count: int
) -> list[dict[str, Any]]:
  ref, policy = jax.device_get((ref, policy))
  out = []
  for i in range(min(count, len(prompt_BxP))):
    row = {'prompt': _ids(prompt_BxP[i], valid_BxP[i])}
    for name, s in (('pi_ref', ref), ('policy', policy)):
      row[name] = _ids(s.tokens_BxSxG[i, 0], s.mask_BxSxG[i, 0])
      row[f'{name}_reward'] = float(s.reward_BxS[i, 0])
    out.append(row)
  return out


def with_text(
  table: dict[str, Any], prompt_text: Callable[[list[int]], str], decode: Callable[[list[int]], str]
) -> dict[str, Any]:
  """The table with its examples' token ids replaced by text."""
  if 'examples' not in table:
    return table
  texts = lambda row: {
    'prompt': prompt_text(row['prompt']),
    'pi_ref': decode(row['pi_ref']),
    'policy': decode(row['policy']),
  }
  return {**table, 'examples': [{**row, **texts(row)} for row in table['examples']]}


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
  nll = (
    'Per-token NLL under pi_ref: policy samples '
    f'{table["nll_ref_per_token_policy"]:.3f}, pi_ref samples {table["nll_ref_per_token_ref"]:.3f}.'
  )
  lines += [verdict, versus + '.', nll]
  for row in table.get('examples', ()):
    if isinstance(row['prompt'], str):
      lines += [
        f'prompt: {row["prompt"]!r}',
        f'  pi_ref ({row["pi_ref_reward"]:+.3f}): {row["pi_ref"]!r}',
        f'  policy ({row["policy_reward"]:+.3f}): {row["policy"]!r}',
      ]
  return '\n'.join(lines)
