"""Text rewards for tests (reward.function='tests.text_rewards:<name>'), each with the
behaviour a test needs; `letter_score` has an exact twin over token ids (`letter_twin`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def letter_score(prompts: list[str], responses: list[str]) -> list[float]:
  """The number of 'a's in the response minus half the number of 'e's in the prompt."""
  return [r.count('a') - 0.5 * p.count('e') for p, r in zip(prompts, responses, strict=True)]


def letter_twin(tokenizer):
  """`letter_score` as a function of ids: each token's count of the letter in its bytes
  (special tokens, dropped by decoding, count 0). Exact for a byte-level BPE: an ASCII
  byte always decodes to itself, whatever bytes around it fail to form UTF-8."""
  hf = tokenizer.hf
  special = set(hf.all_special_ids)

  def table(letter):
    return jnp.asarray(
      [0 if i in special else hf.convert_ids_to_tokens(i).count(letter) for i in range(len(hf))],
      jnp.float32,
    )

  a, e = table('a'), table('e')

  def twin(params, prompt_BxP, valid_BxP, response_BxG, mask_BxG):
    del params
    prompt_e = jnp.sum(jnp.where(valid_BxP, e[prompt_BxP], 0.0), -1)
    return jnp.sum(jnp.where(mask_BxG, a[response_BxG], 0.0), -1) - 0.5 * prompt_e

  return twin


def wrong_length(prompts, responses):
  return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses):
  return [float('nan') if 'cat' in p else 0.0 for p in prompts]


def raises(prompts, responses):
  return [1.0 / (len(r) - len(r)) for r in responses]  # ZeroDivisionError


def fails_on_long_responses(prompts, responses):
  """Fine at start-up (empty responses), fails once the run produces text."""
  if any(responses):
    raise ValueError('the scorer lost its connection')
  return np.zeros(len(responses))


def not_numbers(prompts, responses):
  return ['good'] * len(responses)
