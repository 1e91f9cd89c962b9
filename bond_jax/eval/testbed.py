"""An exact testbed: a real policy over an enumerable space, where every BOND quantity is exact.

The policy is the real `model.Decoder` (a tiny config) generating exactly
`length` tokens (no EOS) from a vocabulary of `vocab` tokens, after a one-token
prompt that names one of `num_prompts` fixed contexts. So there are
Y = vocab^length generations per prompt (4^4 = 256 by default) and

  log pi(y | x) for every y   by teacher forcing all of them (`sampling.sequence_logprobs`),
  p_lt, p_le, pi_BoN          by `bon.log_quantiles` / `bon.log_pi_bon` (Theorem 1),
  KLs, J_beta, E[r]           by summation over y,

with no sampling anywhere. The reward is a fixed table over (prompt, sequence),
read by a traceable `reward_fn` through the sequence's base-`vocab` code
(y_0 most significant), so the *real* `train.train_step` runs on it unchanged.
The default table has distinct values, so Theorem 1's order needs no tie rule
(where ties are wanted, `bon`'s index rule applies: lower code = worse).

Shapes: P prompts, Y sequences, G = length, V = vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax.algo import bon
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree


def tiny_model(vocab: int = 4, tied: bool = False) -> model_lib.ModelConfig:
  """A one-layer decoder; `tied` chooses its capacity on 4^4 sequences.

  Untied (default): fits Best-of-4 of its own init to J_0.5 ~ 0.01 nats by exact
  gradient descent, so training can approach pi_BoN. Tied embeddings (with a
  4-token vocabulary) leave that optimum at ~0.18 nats: a policy that cannot
  represent pi_BoN, like an LLM, where the choice of divergence matters (Fig. 2).
  """
  return model_lib.ModelConfig(
    vocab_size=vocab,
    num_layers=1,
    embed_dim=32,
    hidden_dim=64,
    num_heads=2 if tied else 4,
    num_kv_heads=1,
    head_dim=16,
    tie_embeddings=tied,
  )


def all_sequences(vocab: int, length: int) -> np.ndarray:
  """Every sequence [Y, G], in order of its base-`vocab` code (row y has code y)."""
  code_Y = np.arange(vocab**length)
  digits = [(code_Y // vocab ** (length - 1 - t)) % vocab for t in range(length)]
  return np.stack(digits, axis=-1).astype(np.int32)


def sequence_code(tokens_BxG: jax.Array, vocab: int) -> jax.Array:
  """Base-`vocab` code of each row, y_0 most significant (the inverse of `all_sequences`)."""
  g = tokens_BxG.shape[-1]
  weights_G = vocab ** jnp.arange(g - 1, -1, -1)
  return jnp.sum(tokens_BxG.astype(jnp.int32) * weights_G, axis=-1)


def random_reward_table(
  rng: np.random.Generator,
  num_prompts: int,
  num_sequences: int,
  vocab: int,
  length: int,
  structure: float = 1.0,
) -> np.ndarray:
  """Distinct rewards [P, Y]: a per-(position, token) score summed over y, plus noise.

  The additive part makes good sequences share tokens (a language-model-like
  structure), the Gaussian part makes every value distinct and the table
  non-factorised; `structure` weighs the first against the second.
  """
  seqs_YxG = all_sequences(vocab, length)
  out = np.empty((num_prompts, num_sequences))
  for p in range(num_prompts):
    score_GxV = rng.normal(size=(length, vocab))
    additive_Y = score_GxV[np.arange(length), seqs_YxG].sum(-1)
    out[p] = structure * additive_Y + rng.normal(size=num_sequences)
  return out.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (jit static arg)
class Testbed:
  """Fixed prompts, a fixed reward table and exact evaluation of any policy's parameters."""

  cfg: model_lib.ModelConfig
  length: int  # G: every generation has exactly this many tokens
  reward_PxY: np.ndarray  # reward of sequence code y after prompt p

  @property
  def vocab(self) -> int:
    return self.cfg.vocab_size

  @property
  def num_prompts(self) -> int:
    return self.reward_PxY.shape[0]

  @property
  def num_sequences(self) -> int:
    return self.vocab**self.length

  def sampling_params(self) -> sampling.SamplingParams:
    """Exact sampling (temperature 1, no truncation), no EOS: always `length` tokens."""
    return sampling.SamplingParams(max_new_tokens=self.length, eos_id=None)

  def prompts(self, batch: int) -> tuple[jax.Array, jax.Array]:
    """(prompt_Bx1, valid_Bx1): row b asks prompt b % P (one token: its id)."""
    prompt_Bx1 = (jnp.arange(batch, dtype=jnp.int32) % self.num_prompts)[:, None]
    return prompt_Bx1, jnp.ones_like(prompt_Bx1, bool)

  def reward_fn(
    self,
    prompt_BxP: jax.Array,
    prompt_valid_BxP: jax.Array,
    response_BxG: jax.Array,
    response_mask_BxG: jax.Array,
  ) -> jax.Array:
    """Table lookup r(x, y): a `train.RewardFn`, traceable."""
    del prompt_valid_BxP, response_mask_BxG  # every row is one real prompt token + G tokens
    table_PxY = jnp.asarray(self.reward_PxY)
    return table_PxY[prompt_BxP[:, 0], sequence_code(response_BxG, self.vocab)]

  def all_rows(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(prompt, prompt_valid, response, response_mask) for every (p, y), row p * Y + y."""
    p, y = self.num_prompts, self.num_sequences
    prompt_Bx1 = jnp.repeat(jnp.arange(p, dtype=jnp.int32), y)[:, None]
    tokens_BxG = jnp.tile(jnp.asarray(all_sequences(self.vocab, self.length)), (p, 1))
    return (
      prompt_Bx1,
      jnp.ones_like(prompt_Bx1, bool),
      tokens_BxG,
      jnp.ones_like(tokens_BxG, bool),
    )

  def log_probs(self, params: PyTree) -> jax.Array:
    """Exact log pi(y | x_p) [P, Y] by teacher forcing every sequence after every prompt."""
    logp_BxG = sampling.sequence_logprobs(self.cfg, params, *self.all_rows())
    return logp_BxG.sum(-1).reshape(self.num_prompts, self.num_sequences)

  def log_quantiles(self, log_pi_ref_PxY: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact (log p_lt, log p_le) of every sequence under pi_ref (Eq. 2-5, index tie rule)."""
    return bon.log_quantiles(log_pi_ref_PxY, jnp.asarray(self.reward_PxY))

  def log_pi_bon(self, log_pi_ref_PxY: jax.Array, n: int) -> jax.Array:
    """Exact log pi_BoN [P, Y] of Best-of-n of pi_ref (Theorem 1, product form)."""
    log_p_lt, log_p_le = self.log_quantiles(log_pi_ref_PxY)
    return bon.log_pi_bon_theorem1(log_pi_ref_PxY, log_p_lt, log_p_le, n)

  def evaluate(
    self, params: PyTree, ref_params: PyTree, n: int, beta: float = 0.5
  ) -> dict[str, jax.Array]:
    """Exact metrics of the policy `params`, averaged over prompts.

    BOND quantities are against Best-of-n of `ref_params` (pi_ref); pass the
    anchor as `ref_params` for Best-of-n of the anchor.
    """
    log_pi = self.log_probs(params)
    log_ref = self.log_probs(ref_params)
    log_bon = self.log_pi_bon(log_ref, n)
    _, log_p_le = self.log_quantiles(log_ref)
    pi = jnp.exp(log_pi)
    bwd, fwd = kl(log_pi, log_bon), kl(log_bon, log_pi)
    return {
      'reward': jnp.mean(jnp.sum(pi * self.reward_PxY, -1)),
      'reward_bon': jnp.mean(jnp.sum(jnp.exp(log_bon) * self.reward_PxY, -1)),
      'kl_ref': jnp.mean(kl(log_pi, log_ref)),
      'kl_bwd': jnp.mean(bwd),  # KL(pi || pi_BoN)
      'kl_fwd': jnp.mean(fwd),  # KL(pi_BoN || pi)
      'jeffreys': jnp.mean((1.0 - beta) * fwd + beta * bwd),  # J_beta (Eq. 11)
      'log_quantile': jnp.mean(jnp.sum(pi * log_p_le, -1)),  # E_pi[log p_le(y)] vs pi_ref
    }


def kl(log_p_PxY: jax.Array, log_q_PxY: jax.Array) -> jax.Array:
  """Exact KL(p || q) per prompt [P] by summation (0 log 0 = 0)."""
  p_PxY = jnp.exp(log_p_PxY)
  terms = jnp.where(p_PxY > 0, p_PxY * (log_p_PxY - log_q_PxY), 0.0)
  return jnp.sum(terms, axis=-1)


def make(
  seed: int = 0,
  num_prompts: int = 2,
  vocab: int = 4,
  length: int = 4,
  structure: float = 1.0,
  tied: bool = False,
) -> tuple[Testbed, Any]:
  """A testbed and pi_ref's parameters (a randomly initialised decoder), from one seed.

  pi_ref is the decoder at init: entropy ~3.8-4.5 nats of log 256 = 5.5, its most
  likely sequence at 0.1-0.2, so Best-of-N changes it everywhere. (Tied
  embeddings alone would repeat the input token with probability ~0.9, so the
  tied model's embedding matrix, its input and output layer alike, is scaled by
  1/2; the reward table is not.)
  """
  cfg = tiny_model(vocab, tied)
  table = random_reward_table(
    np.random.default_rng(seed), num_prompts, vocab**length, vocab, length, structure
  )
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  if tied:
    params['embedder']['embedding'] = params['embedder']['embedding'] * 0.5
  return Testbed(cfg=cfg, length=length, reward_PxY=table), params
