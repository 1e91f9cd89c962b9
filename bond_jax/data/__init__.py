"""Data: tokenizers of local checkpoints, prompt streams (TFDS or JSONL) with a saveable
position, rewards (a reward model, a program of the ids, or a Python function of the text),
and the embedded noisy-copy task.

Public: the names below; `text_rewards` holds the shipped text rewards (VADER sentiment).
"""

from bond_jax.data import text_rewards
from bond_jax.data.prompts import PromptStream, jsonl_texts, tfds_texts
from bond_jax.data.rewards import (
  PROGRAMMATIC,
  RewardFunctionError,
  load_function,
  make_reward,
  python_reward,
)
from bond_jax.data.tasks import NoisyCopy
from bond_jax.data.tokenizer import SpecialIds, Tokenizer
from bond_jax.data.tokenizer import load as load_tokenizer

__all__ = [
  'PROGRAMMATIC',
  'NoisyCopy',
  'PromptStream',
  'RewardFunctionError',
  'SpecialIds',
  'Tokenizer',
  'jsonl_texts',
  'load_function',
  'load_tokenizer',
  'make_reward',
  'python_reward',
  'text_rewards',
  'tfds_texts',
]
