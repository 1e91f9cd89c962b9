"""A scalar reward model: our decoder's final hidden states and a linear `score` head.

Matches transformers' *ForSequenceClassification with num_labels=1: the score is
read at the LAST real token of each row. transformers (5.x) finds that token from
the ids, as the rightmost position whose id != pad_token_id, which handles left
and right padding alike. We take it from the validity mask instead (the rightmost
position where valid_BxT is True), so the two agree whenever padding uses
pad_token_id and no real token equals it. (When the pad id also occurs as a real
token, e.g. pad == eos at the end of a row, transformers skips that token; the
mask does not. A row with no valid token is scored at position 0, as transformers'
argmax over an all-zero row does.)

Parameters: {'decoder': <model.Decoder params, no lm_head>, 'score': {'kernel': [D, 1]}}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from bond_jax.models import decoder as model_lib
from bond_jax.models.decoder import ModelConfig
from bond_jax.types import PyTree


def last_valid_index(valid_BxT: jax.Array) -> jax.Array:
  """Index of each row's rightmost valid position [B] (0 for a row with none)."""
  t = valid_BxT.shape[-1]
  return jnp.argmax(jnp.arange(t) * valid_BxT.astype(jnp.int32), axis=-1)


class RewardModel(nn.Module):
  """`__call__` returns the float32 reward [B] read at `last_B`."""

  cfg: ModelConfig

  def setup(self):
    self.decoder = model_lib.Decoder(self.cfg)
    self.score = nn.Dense(
      1, use_bias=False, dtype=self.cfg.jnp_dtype, param_dtype=self.cfg.jnp_param_dtype
    )

  def __call__(
    self, tokens_BxT: jax.Array, positions_BxT: jax.Array, mask_BxTxS: jax.Array, last_B: jax.Array
  ) -> jax.Array:
    h_BxTxD, _ = self.decoder.hidden(tokens_BxT, positions_BxT, mask_BxTxS)
    h_BxD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    return self.score(h_BxD)[:, 0].astype(jnp.float32)


def init_params(cfg: ModelConfig, rng: jax.Array) -> PyTree:
  """Random reward-model parameters (the score head starts at Dense's default init)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  return RewardModel(cfg).init(rng, tokens, tokens, mask, jnp.zeros((1,), jnp.int32))['params']


def score(
  cfg: ModelConfig, params: PyTree, tokens_BxT: jax.Array, valid_BxT: jax.Array
) -> jax.Array:
  """Rewards [B] (float32) of left- or right-padded rows."""
  positions_BxT, mask_BxTxT = model_lib.sequence_inputs(valid_BxT)
  return RewardModel(cfg).apply(
    {'params': params}, tokens_BxT, positions_BxT, mask_BxTxT, last_valid_index(valid_BxT)
  )


def score_responses(
  cfg: ModelConfig,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> jax.Array:
  """`score` of each left-padded prompt followed by its response (same vocabulary), read at
  the last valid token: a RewardFn once `cfg` is bound."""
  return score(
    cfg,
    params,
    *model_lib.concat_prompt_response(
      prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG
    ),
  )
