"""The learned quantile model of Appendix B.1 (Eq. 25): p_theta(x, y) ~ p_le(y).

A classifier built from the policy's own architecture: the decoder, initialised
from pi_ref, reads (prompt, response) and a scalar head at the last real token
gives a logit; p_theta = sigmoid(logit). The paper views the quantile as the
parameter of the Bernoulli variable Z = 1[r(x, y') <= r(x, y)], y' ~ pi_anchor(x),
and trains p_theta by binary cross-entropy on Z (maximum likelihood), jointly
with the policy. Since E[Z | x, y] = p_le(y), the BCE minimiser over all
functions is the true quantile; BOND then uses log p_theta in place of the MC
estimate of Eq. 10.

The network is `reward_model.RewardModel` (decoder + linear `score` head, read
at the last valid token); only the initialisation and the loss are specific to
quantiles. Parameters: {'decoder': <Decoder params of pi_ref, no lm_head>,
'score': {'kernel': [D, 1]}}. The head starts at zero, so every prediction
starts at p_theta = 1/2 (the median), whatever pi_ref's features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bond_jax.models import reward_model
from bond_jax.models.decoder import ModelConfig
from bond_jax.types import PyTree


def init_params(lm_params: PyTree) -> PyTree:
  """Quantile-model parameters from a language model's (a copy: never aliases `lm_params`)."""
  decoder = {k: jax.tree.map(jnp.array, v) for k, v in lm_params.items() if k != 'lm_head'}
  embedding_VxD = lm_params['embedder']['embedding']
  kernel_Dx1 = jnp.zeros((embedding_VxD.shape[1], 1), embedding_VxD.dtype)
  return {'decoder': decoder, 'score': {'kernel': kernel_Dx1}}


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Adam for the quantile model. Its state has the same structure for every learning rate."""
  return optax.adam(learning_rate)


def logits(
  cfg: ModelConfig,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> jax.Array:
  """logit p_theta(x, y) [B], float32, read at the last generated token."""
  return reward_model.score_responses(
    cfg, params, prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG
  )


def log_quantile(logit_B: jax.Array) -> jax.Array:
  """log p_theta = log sigmoid(logit): finite for every finite logit, <= 0."""
  return jax.nn.log_sigmoid(logit_B)


def targets(reward_B: jax.Array, anchor_rewards_BxK: jax.Array) -> jax.Array:
  """Z = 1[r(y') <= r(y)] (Eq. 25), averaged over the K anchor samples y' of each row.

  The mean of K indicators is a soft label with the same conditional
  expectation p_le(y) as one indicator, so the BCE has the same minimiser and
  a lower-variance gradient. Ties count as "<=", as in `bon.mc_log_quantile`.
  """
  return jnp.mean((anchor_rewards_BxK <= reward_B[:, None]).astype(jnp.float32), axis=-1)


def bce_loss(logit_B: jax.Array, z_B: jax.Array) -> jax.Array:
  """Binary cross-entropy of Eq. 25, -[Z log p + (1 - Z) log(1 - p)], averaged over rows."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logit_B, z_B))
