"""Tokenizers of Hugging Face policies and reward models, read from local files only.

A `Tokenizer` wraps transformers' `AutoTokenizer` with the three decisions the
rest of the pipeline must agree on:

- Special ids (`SpecialIds`). `eos_id` is where the sampler stops a row
  (`SamplingParams.eos_id`); `pad_id` fills prompt left-padding and the slots
  after EOS (`SamplingParams.pad_id`). A tokenizer without a pad token pads with
  EOS: padding is always masked out (prompt_valid / response_mask), so the id is
  never read by a model. `eos_token` overrides EOS, e.g. '<end_of_turn>' for an
  instruction-tuned Gemma, whose turns end there rather than at '<eos>'.
- BOS. Gemma and Llama models expect every sequence to start with BOS, and their
  tokenizers add it; Qwen2 has none. `add_bos` records what the tokenizer does by
  itself, and `encode` applies it once: a chat template that already writes BOS
  does not get a second one.
- Chat template. Instruction-tuned policies see the prompt as a single user turn
  followed by the generation prompt (`apply_chat_template(...,
  add_generation_prompt=True)`); `prompt_text` inverts it, so a reward model with
  another tokenizer can be shown the user's text.

Nothing is downloaded: `local_files_only=True`, and never `trust_remote_code`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bond_jax.types import ConfigError

_SENTINEL = '\x00BOND_TEXT\x00'  # stands for the user's text when splitting a chat template


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids shared by prompts, the sampler and the rewards."""

  eos_id: int  # the sampler stops a row after emitting it
  pad_id: int  # prompt left-padding and filler after EOS; = eos_id when the tokenizer has none
  bos_id: int | None  # None: the tokenizer has no BOS token
  add_bos: bool  # every encoded sequence starts with exactly one bos_id


class Tokenizer:
  """A transformers tokenizer plus the prompt format of one model (see module docstring)."""

  def __init__(
    self,
    hf: Any,
    ids: SpecialIds,
    chat_template: bool,
    path: str,
    template_field: str = 'tokenizer.chat_template',
  ):
    self.hf = hf
    self.ids = ids
    self.chat_template = chat_template
    self.path = path
    self._prefix = self._suffix = ''
    if chat_template:
      if not hf.chat_template:
        raise ConfigError(
          f'config.{template_field}=True is invalid: the tokenizer in {path!r} '
          f'has no chat template; set {template_field}=False.'
        )
      rendered = self._strip_bos(self.render(_SENTINEL))
      self._prefix, _, self._suffix = rendered.partition(_SENTINEL)

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can emit (added tokens included)."""
    return len(self.hf)

  def render(self, text: str) -> str:
    """The prompt string: `text` as one user turn plus the generation prompt, or `text`."""
    if not self.chat_template:
      return text
    return self.hf.apply_chat_template(
      [{'role': 'user', 'content': text}], tokenize=False, add_generation_prompt=True
    )

  def _with_bos(self, ids: list[int]) -> list[int]:
    if self.ids.add_bos and ids[:1] != [self.ids.bos_id]:
      return [self.ids.bos_id, *ids]
    return ids

  def _strip_bos(self, text: str) -> str:
    bos = self.hf.bos_token
    return text.removeprefix(bos) if bos else text

  def encode(self, text: str) -> list[int]:
    """Prompt ids of `text` (chat template applied when configured; BOS once; no EOS)."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    rendered = [self.render(t) for t in texts]
    ids = self.hf(rendered, add_special_tokens=False)['input_ids'] if rendered else []
    return [self._with_bos(list(x)) for x in ids]

  def truncate_text(self, text: str, num_tokens: int) -> str:
    """The longest prefix of `text` covered by its first `num_tokens` tokens (no specials)."""
    if num_tokens <= 0:
      return ''
    try:
      enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
      offsets = enc['offset_mapping']
      return text if num_tokens >= len(offsets) else text[: offsets[num_tokens - 1][1]]
    except NotImplementedError:  # tokenizers without offsets (Python / sentencepiece backends)
      ids = self.hf(text, add_special_tokens=False)['input_ids']
      return self.hf.decode(ids[:num_tokens], skip_special_tokens=True)

  def prompt_text(self, ids: Sequence[int]) -> str:
    """The user's text behind prompt ids (pads removed): `encode` undone, template stripped."""
    if not self.chat_template:
      return self.hf.decode(list(ids), skip_special_tokens=True)
    full = self._strip_bos(self.hf.decode(list(ids), skip_special_tokens=False))
    if full.startswith(self._prefix) and full.endswith(self._suffix):
      return full[len(self._prefix) : len(full) - len(self._suffix)]
    return self.hf.decode(list(ids), skip_special_tokens=True)  # not our template: best effort

  def decode(self, ids: Sequence[int]) -> str:
    """Text of generated ids, special tokens (EOS, end-of-turn) dropped."""
    return self.hf.decode(list(ids), skip_special_tokens=True)

  def encode_conversation(self, prompt: str, response: str, ended: bool) -> list[int]:
    """Reward-model input for a (prompt text, response text) pair.

    With a chat template: the user turn and the assistant turn as the template
    writes them. Without: BOS (if the tokenizer uses one), prompt + response as
    one string, and EOS when the response `ended` (the policy emitted its EOS), so
    the reward model can tell a finished answer from one cut off by the buffer.
    """
    if self.chat_template:
      text = self.hf.apply_chat_template(
        [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response}],
        tokenize=False,
      )
      return self._with_bos(list(self.hf(text, add_special_tokens=False)['input_ids']))
    ids = self._with_bos(list(self.hf(prompt + response, add_special_tokens=False)['input_ids']))
    return ids + [self.ids.eos_id] if ended else ids

  def same_vocab(self, other: Tokenizer) -> bool:
    """True when ids mean the same thing in both tokenizers (token ids can be shared)."""
    return self.hf.get_vocab() == other.hf.get_vocab() and self.ids.add_bos == other.ids.add_bos


def _special_ids(hf: Any, eos_token: str, path: str, eos_field: str) -> SpecialIds:
  if eos_token:
    eos_id = hf.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == hf.unk_token_id or eos_token not in hf.get_vocab():
      raise ConfigError(
        f'config.{eos_field}={eos_token!r} is invalid: no such token in the tokenizer at {path!r}.'
      )
  else:
    eos_id = hf.eos_token_id
    if eos_id is None:
      fix = (
        f"set config.{eos_field} to the token that ends a response (e.g. '<end_of_turn>')"
        if eos_field
        else 'use a tokenizer that has one'
      )
      raise ConfigError(f'The tokenizer at {path!r} has no EOS token; {fix}.')
  pad_id = hf.pad_token_id if hf.pad_token_id is not None else eos_id
  bos_id = hf.bos_token_id
  probe = hf('a', add_special_tokens=True)['input_ids']
  add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
  return SpecialIds(
    eos_id=int(eos_id),
    pad_id=int(pad_id),
    bos_id=None if bos_id is None else int(bos_id),
    add_bos=add_bos,
  )


def load(
  path: str | Path,
  *,
  chat_template: bool = False,
  eos_token: str = '',
  path_field: str = 'tokenizer.path',
  template_field: str = 'tokenizer.chat_template',
  eos_field: str = 'tokenizer.eos_token',
) -> Tokenizer:
  """The tokenizer saved in the local directory `path` (a checkpoint dir works).

  The *_field arguments name the config fields in error messages; eos_field='' when
  the config has no EOS override for this tokenizer.
  """
  import transformers

  path = str(path)
  if not path:
    raise ConfigError(
      f"config.{path_field}='' is invalid: set it to a local directory holding "
      'the tokenizer files (tokenizer.json / tokenizer_config.json).'
    )
  if not Path(path).is_dir():
    raise ConfigError(f'config.{path_field}={path!r} is invalid: no such directory.')
  try:
    hf = transformers.AutoTokenizer.from_pretrained(
      path, local_files_only=True, trust_remote_code=False
    )
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(
      f'config.{path_field}={path!r} is invalid: no tokenizer could be loaded '
      f'from it ({type(e).__name__}: {str(e).splitlines()[0]}).'
    ) from e
  return Tokenizer(
    hf, _special_ids(hf, eos_token, path, eos_field), chat_template, path, template_field
  )


def check_vocab(tok: Tokenizer, model_vocab_size: int, model_field: str) -> None:
  """Raise unless every id the tokenizer emits has a row in the model's embedding."""
  if tok.vocab_size > model_vocab_size:
    raise ConfigError(
      f'config.{model_field}: the model has vocab_size {model_vocab_size} but '
      f'the tokenizer at {tok.path!r} emits {tok.vocab_size} ids; use the '
      "model's own tokenizer."
    )
