"""The loss terms of BOND, J-BOND and REINFORCE: small pure functions of sequence
log-likelihoods, rewards and returns.

Every log-likelihood here is a sequence log-likelihood, summed over generated
tokens only (see `sampling.sequence_logprobs`). Each surrogate is written so
that its *gradient* is the one the paper states; its value is not the divergence.
The spec these follow is ALGORITHMS.md (sections 4, 6, 7); paper equations cited.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


def forward_kl_loss(logp_bon_B: jax.Array) -> jax.Array:
  """Forward KL(pi_BoN || pi), Eq. 13: supervised fine-tuning on Best-of-N samples.

  grad = -E_{y ~ pi_BoN}[grad log pi(y)]; `logp_bon_B` is log pi of one
  Best-of-N sample of the anchor per prompt.
  """
  return -jnp.mean(logp_bon_B)


def policy_gradient_loss(logp_B: jax.Array, advantage_B: jax.Array) -> jax.Array:
  """REINFORCE surrogate: gradient -E[A(y) grad log pi(y)], with A held constant."""
  return -jnp.mean(sg(advantage_B) * logp_B)


def kl_regularizer_loss(logp_B: jax.Array, logp_anchor_B: jax.Array) -> jax.Array:
  """J-BOND's extra KL term (Eq. 19, ALGORITHMS.md section 6 step 4).

  Its gradient, E_{y~pi}[(log pi(y) - log pi_anchor(y)) grad log pi(y)], is
  grad KL(pi || pi_anchor) (the score-function identity E[grad log pi] = 0
  removes the other term), so *descending* this loss pulls pi toward the
  anchor. (The OCR of Algorithm 2 shows the opposite sign; this one is right.)
  """
  return jnp.mean(sg(logp_B - logp_anchor_B) * logp_B)


def leave_one_out_baseline(returns_B: jax.Array) -> jax.Array:
  """For each row, the mean return of the *other* rows of the batch."""
  n = returns_B.shape[0]
  if n < 2:
    return jnp.zeros_like(returns_B)
  return (jnp.sum(returns_B) - returns_B) / (n - 1)


def best_of(rewards_BxN: jax.Array) -> jax.Array:
  """Index of the best of N samples per prompt. Ties go to the lowest index."""
  return jnp.argmax(rewards_BxN, axis=-1)  # argmax returns the first maximum


def backward_kl_advantage(
  r_B: jax.Array,
  logp_B: jax.Array,
  logp_anchor_B: jax.Array,
  reward_scale: float = 1.0,
  use_baseline: bool = True,
) -> jax.Array:
  """Advantage of the backward-KL policy gradient, in nats (Eq. 15).

  R(y) = reward_scale * r(y) - (log pi(y) - log pi_anchor(y)), minus the
  leave-one-out baseline. For BOND r = r_BOND and reward_scale = N - 1, so
  -E[R grad log pi] is grad KL(pi || pi_BoN) up to the baseline; for J-BOND
  r = r_J and reward_scale = 1 (Algorithm 2).
  """
  returns_B = reward_scale * r_B - sg(logp_B - logp_anchor_B)
  if use_baseline:
    returns_B = returns_B - leave_one_out_baseline(returns_B)
  return sg(returns_B)


def reinforce_advantage(
  reward_BxM: jax.Array, logp_BxM: jax.Array, logp_ref_BxM: jax.Array, beta_rl: float
) -> jax.Array:
  """KL-regularised REINFORCE (Eq. 1) with M >= 2 samples per prompt.

  Return r(y) - beta_RL (log pi(y) - log pi_ref(y)); the baseline of each sample
  is the mean return of the other samples of the same prompt (leave-one-out).
  """
  m = reward_BxM.shape[-1]
  returns_BxM = reward_BxM - beta_rl * sg(logp_BxM - logp_ref_BxM)
  baseline_BxM = (jnp.sum(returns_BxM, axis=-1, keepdims=True) - returns_BxM) / (m - 1)
  return sg(returns_BxM - baseline_BxM)
