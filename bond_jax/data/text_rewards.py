"""Rewards that are functions of text, for reward.source='python'.

A reward here (or in any module of yours) takes the batch's prompts and responses as two
lists of strings and returns one finite float per response; name it in the config as
reward.function='module:function' or 'path/to/file.py:function' (`rewards.load_function`).
It runs on the host, once per batch of rows, inside the compiled step
(`rewards.TextReward`). For example, a verifier that pays 1 for the right number:

    import re

    def arithmetic_verifier(prompts: list[str], responses: list[str]) -> list[float]:
      out = []
      for prompt, response in zip(prompts, responses):
        a, b = map(int, re.findall(r'-?\\d+', prompt)[:2])  # 'What is 17 + 25?'
        said = re.findall(r'-?\\d+', response)
        out.append(1.0 if said and int(said[0]) == a + b else 0.0)
      return out
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

INSTALL = 'pip install -e . -r requirements-real.txt'


@functools.cache
def _vader() -> Any:
  try:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: PLC0415
  except ImportError:
    raise ImportError(f'vaderSentiment is not installed: {INSTALL}') from None
  return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
  """VADER's compound sentiment of each response alone, in [-1, 1] (Hutto and Gilbert,
  2014: a lexicon with rules for negation, intensifiers, 'but' and punctuation). The
  prompts are not scored: the shipped prompt sets stop just before the opinion and score
  exactly 0 by themselves."""
  del prompts
  analyzer = _vader()
  return [analyzer.polarity_scores(r)['compound'] for r in responses]
