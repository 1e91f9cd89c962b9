"""What the paper measures (ALGORITHMS.md section 8), estimated from samples.

One implementation for the evaluation script, the training-time evaluation and the
reproductions. Per prompt: K samples of pi_ref and M samples of the policy, each scored by
the reward and by both models' sequence log-likelihoods (`Scores`). Every estimator is a
pure function of those arrays (jit-able):

  reward of the policy (and its standard error over prompts), of pi_ref, of Best-of-N of
    pi_ref (unbiased, `bon.bon_expected_max`)
  KL(pi || pi_ref) = E_pi[log pi - log pi_ref]
  log quantile: mean log p_le of policy samples among the K pi_ref samples (the finite
    estimator of Eq. 10 that training uses, `bon.mc_log_quantile`)
  win rate: P[r(y) > r(y')] + P[r(y) = r(y')] / 2, y ~ pi, y' ~ pi_ref
  NLL per token under pi_ref of the policy's samples (and of pi_ref's own, for scale)
  KL(pi || pi_BoN) and KL(pi_BoN || pi) for one N: Theorem 1 applied to the reward levels
    of the K samples (`log_bon_weight`), Best-of-N samples drawn without replacement from
    the K (weights C(j-1, N-1) / C(K, N) by rank).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from bond_jax.algo import bon, rollout
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree, RewardFn


@struct.dataclass
class Scores:
  """Samples of one model, S per prompt: rewards and both models' log-likelihoods [B, S]."""

  reward_BxS: jax.Array
  logp_policy_BxS: jax.Array  # log pi(y) of the policy being evaluated
  logp_ref_BxS: jax.Array  # log pi_ref(y)
  tokens_BxSxG: jax.Array  # the samples themselves (pad after EOS)
  mask_BxSxG: jax.Array  # True up to and including EOS


def score_samples(
  cfg: model_lib.ModelConfig,
  sample_params: PyTree,
  policy_params: PyTree,
  ref_params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  rng: jax.Array,
  sp: sampling.SamplingParams,
  per_prompt: int,
  reward_fn: RewardFn,
  reward_params: PyTree,
  sampled_by: str | None = None,
  micro_batch: int = 0,
  chunk: int = 0,
) -> Scores:
  """`per_prompt` samples of `sample_params` per prompt, scored (traceable; no host sync).

  sampled_by: 'policy' or 'ref' when `sample_params` are that model's and `sp` draws from
  its own distribution (temperature 1, untruncated): its log-likelihoods are then the
  sampler's own, and only the other model reads the samples again (one pass, not two).
  micro_batch: prompts sampled and scored at a time (0: all; each row's randomness is keyed
  by its prompt's index, so the samples are the same); chunk: response positions turned
  into logits at a time when the samples are read (0: all)."""
  if sampled_by not in (None, 'policy', 'ref'):
    raise ValueError(f"sampled_by={sampled_by!r}: None, 'policy' or 'ref'")
  if sampled_by and not sp.is_exact:
    raise ValueError(f'sampled_by={sampled_by!r} needs samples from the model itself: {sp}')

  def one(batch: tuple[jax.Array, jax.Array, jax.Array]) -> Scores:
    prompt_BxP, prompt_valid_BxP, prompt_ids_B = batch
    out = sampling.sample(
      cfg, sample_params, prompt_BxP, prompt_valid_BxP, rng, sp, per_prompt, prompt_ids_B
    )
    prompt = jnp.repeat(prompt_BxP, per_prompt, axis=0)
    valid = jnp.repeat(prompt_valid_BxP, per_prompt, axis=0)
    grid = lambda x_B: x_B.reshape(-1, per_prompt, *x_B.shape[1:])
    # A model reading the samples reads each prompt once for its per_prompt responses.
    read = lambda params: sampling.grouped_sequence_logprobs(
      cfg, params, prompt_BxP, prompt_valid_BxP, grid(out.tokens_BxG), grid(out.mask_BxG), chunk
    ).sum(-1)
    logp = lambda params, who: grid(out.logprobs_BxG.sum(-1)) if who == sampled_by else read(params)
    reward_B = reward_fn(reward_params, prompt, valid, out.tokens_BxG, out.mask_BxG)
    return Scores(
      reward_BxS=grid(reward_B.astype(jnp.float32)),
      logp_policy_BxS=logp(policy_params, 'policy'),
      logp_ref_BxS=logp(ref_params, 'ref'),
      tokens_BxSxG=grid(out.tokens_BxG),
      mask_BxSxG=grid(out.mask_BxG),
    )

  prompts = (prompt_BxP, prompt_valid_BxP, jnp.arange(prompt_BxP.shape[0]))
  return rollout.map_micro_batches(one, prompts, micro_batch, 'eval.micro_batch_size')


def nll_per_token(samples: Scores) -> jax.Array:
  """-log pi_ref(y) per generated token, over all samples: how unlikely pi_ref finds the
  text (degenerate text such as a repeated word scores high against pi_ref's own samples)."""
  return -jnp.sum(samples.logp_ref_BxS) / jnp.maximum(jnp.sum(samples.mask_BxSxG), 1)


def log_bon_weight(lt_count: jax.Array, le_count: jax.Array, total: int, n: int) -> jax.Array:
  """log pi_BoN(y) / pi_ref(y) for y's reward level, F = le / total and F_- = lt / total:
  Theorem 1 (Eq. 5) on reward levels, a level's mass shared by its sequences."""
  log_lt, log_le = jnp.log(lt_count / total), jnp.log(le_count / total)
  return bon.log_pi_bon(log_lt, log_le, n) - jnp.log((le_count - lt_count) / total)


def win_rate(policy_reward_BxM: jax.Array, ref_reward_BxK: jax.Array) -> jax.Array:
  """P[r(y) > r(y')] + P[r(y) = r(y')] / 2 over every (policy, pi_ref) pair of a prompt."""
  lt_BxM, le_BxM = bon.mc_counts(policy_reward_BxM, ref_reward_BxK[:, None, :])
  k = ref_reward_BxK.shape[-1]
  return jnp.mean((lt_BxM + 0.5 * (le_BxM - lt_BxM)) / k)


def kl_to_bon(policy: Scores, ref: Scores, n: int) -> tuple[jax.Array, jax.Array]:
  """(KL(pi || pi_BoN), KL(pi_BoN || pi)) for Best-of-n of pi_ref, from K pi_ref samples.

  Backward: E_pi[log pi - log pi_ref - log w(y)], y's level placed among {y} and the K
  samples (so it always has mass). Forward: E_{y ~ BoN}[log pi_ref + log w - log pi], y the
  best of n of the K samples without replacement (rank j of K, 1 = worst, has weight
  C(j-1, n-1) / C(K, n); ties ranked by sample index), each level among the K themselves.
  """
  k = ref.reward_BxS.shape[-1]
  if not 1 <= n <= k:
    raise ValueError(f'KL to Best-of-{n} needs at least {n} pi_ref samples per prompt, got {k}')
  lt_BxM, le_BxM = bon.mc_counts(policy.reward_BxS, ref.reward_BxS[:, None, :])
  backward = jnp.mean(
    policy.logp_policy_BxS - policy.logp_ref_BxS - log_bon_weight(lt_BxM, 1.0 + le_BxM, k + 1, n)
  )
  rank_BxK = jnp.argsort(jnp.argsort(ref.reward_BxS, axis=-1, stable=True), axis=-1)
  weight_BxK = jnp.asarray(bon.best_of_n_rank_weights(k, n), jnp.float32)[rank_BxK]
  lt_BxK, le_BxK = bon.mc_counts(ref.reward_BxS, ref.reward_BxS[:, None, :])
  log_w_BxK = log_bon_weight(lt_BxK, le_BxK, k, n)
  forward_B = jnp.sum(weight_BxK * (ref.logp_ref_BxS + log_w_BxK - ref.logp_policy_BxS), -1)
  return backward, jnp.mean(forward_B)


def policy_metrics(policy: Scores, ref: Scores, kl_n: int | None = None) -> dict[str, jax.Array]:
  """The section 8 metrics of the policy against pi_ref (traceable)."""
  reward_B = jnp.mean(policy.reward_BxS, axis=-1)
  num_prompts = policy.reward_BxS.shape[0]
  out = {
    'reward': jnp.mean(policy.reward_BxS),
    'reward_stderr': jnp.std(reward_B) / math.sqrt(num_prompts),
    'kl_ref': jnp.mean(policy.logp_policy_BxS - policy.logp_ref_BxS),
    'log_quantile': jnp.mean(bon.mc_log_quantile(policy.reward_BxS, ref.reward_BxS[:, None, :])),
    'win_rate': win_rate(policy.reward_BxS, ref.reward_BxS),
    'nll_ref_per_token': nll_per_token(policy),
  }
  if kl_n is not None:
    out['kl_bwd'], out['kl_fwd'] = kl_to_bon(policy, ref, kl_n)
  return out


def reference_metrics(ref: Scores, bon_ns: tuple[int, ...]) -> dict[str, jax.Array]:
  """Mean reward of pi_ref and of Best-of-N of pi_ref for each N (unbiased from K >= N)."""
  out = {'reward_ref': jnp.mean(ref.reward_BxS), 'nll_ref_per_token': nll_per_token(ref)}
  for n in bon_ns:
    out[f'reward_bon_{n}'] = jnp.mean(bon.bon_expected_max(ref.reward_BxS, n))
  return out
