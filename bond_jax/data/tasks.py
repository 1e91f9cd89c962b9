"""The embedded task: noisy copy. Prompts, reward and supervised data, with no download.

A prompt is `prompt_len` random content tokens followed by a separator; the
ideal response copies the content tokens and ends with EOS. The reference
policy pi_ref is a real model trained by supervised learning (`sft.py`) on
*noisy* demonstrations: each response token is the right one with probability
`keep_prob` and otherwise a uniformly random content token. So pi_ref copies
each position correctly only about keep_prob of the time.

The reward is the number of positions copied correctly (0..prompt_len). Under
pi_ref it is spread roughly Binomial(prompt_len, ~keep_prob), so Best-of-N
clearly helps, and it cannot be maxed by any fixed token: the right answer is
different for every prompt. Everything is a traceable JAX function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PAD, EOS, SEP = 0, 1, 2
FIRST_CONTENT = 3


@dataclasses.dataclass(frozen=True)
class NoisyCopy:
  vocab_size: int
  prompt_len: int  # content tokens per prompt
  keep_prob: float  # chance a demonstration token is correct

  def __post_init__(self):
    if self.vocab_size <= FIRST_CONTENT + 1:
      raise ValueError(f'task needs model vocab_size > {FIRST_CONTENT + 1}, got {self.vocab_size}.')

  @property
  def num_content(self) -> int:
    return self.vocab_size - FIRST_CONTENT

  @property
  def prompt_width(self) -> int:
    return self.prompt_len + 1

  @property
  def response_len(self) -> int:
    """Length of an ideal response: the copy and EOS."""
    return self.prompt_len + 1

  def prompts(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(prompt_BxP, valid_BxP); every prompt has the same length, so no padding."""
    content = jax.random.randint(rng, (batch, self.prompt_len), FIRST_CONTENT, self.vocab_size)
    prompt = jnp.concatenate([content, jnp.full((batch, 1), SEP)], axis=1).astype(jnp.int32)
    return prompt, jnp.ones_like(prompt, bool)

  def reward(
    self,
    prompt_BxP: jax.Array,
    prompt_valid_BxP: jax.Array,
    response_BxG: jax.Array,
    response_mask_BxG: jax.Array,
  ) -> jax.Array:
    """Number of positions i < prompt_len where the response copies the prompt."""
    del prompt_valid_BxP
    n = self.prompt_len
    g = response_BxG.shape[1]
    if g < n:
      response_BxG = jnp.pad(response_BxG, ((0, 0), (0, n - g)), constant_values=PAD)
      response_mask_BxG = jnp.pad(response_mask_BxG, ((0, 0), (0, n - g)))
    hit_BxN = (response_BxG[:, :n] == prompt_BxP[:, :n]) & response_mask_BxG[:, :n]
    return hit_BxN.sum(axis=-1).astype(jnp.float32)

  def demonstrations(self, rng: jax.Array, batch: int) -> tuple[jax.Array, ...]:
    """Noisy supervised pairs: (prompt, prompt_valid, response, response_mask)."""
    k_prompt, k_keep, k_noise = jax.random.split(rng, 3)
    prompt, valid = self.prompts(k_prompt, batch)
    content = prompt[:, : self.prompt_len]
    keep = jax.random.bernoulli(k_keep, self.keep_prob, content.shape)
    noise = jax.random.randint(k_noise, content.shape, FIRST_CONTENT, self.vocab_size)
    response = jnp.concatenate(
      [jnp.where(keep, content, noise), jnp.full((batch, 1), EOS)], axis=1
    ).astype(jnp.int32)
    return prompt, valid, response, jnp.ones_like(response, bool)
