"""Tokenizer loading from local files: special ids, BOS once, chat template and its inverse."""

from __future__ import annotations

import pytest

from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.types import ConfigError
from tests import hf_fixtures as hx

TEXT = 'The cat sat on the mat.'


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  return hx.make_tokenizer_dir(tmp_path_factory.mktemp('tok'))


@pytest.fixture(scope='module')
def plain(tok_dir):
  return tokenizer_lib.load(tok_dir)


@pytest.fixture(scope='module')
def chat(tok_dir):
  return tokenizer_lib.load(tok_dir, chat_template=True)


def test_special_ids_follow_the_tokenizer(plain):
  # Gemma layout: <pad>=0, <eos>=1, <bos>=2; the tokenizer itself prepends BOS.
  assert plain.ids == tokenizer_lib.SpecialIds(eos_id=1, pad_id=0, bos_id=2, add_bos=True)
  assert plain.vocab_size == len(plain.hf)


def test_pad_falls_back_to_eos(tmp_path):
  tok = tokenizer_lib.load(hx.make_tokenizer_dir(tmp_path, pad_token=False))
  assert tok.hf.pad_token_id is None
  assert tok.ids.pad_id == tok.ids.eos_id == 1


def test_eos_override(tok_dir):
  tok = tokenizer_lib.load(tok_dir, chat_template=True, eos_token='<end_of_turn>')
  assert tok.ids.eos_id == tok.hf.convert_tokens_to_ids('<end_of_turn>') != tok.hf.eos_token_id
  with pytest.raises(ConfigError, match=r"tokenizer\.eos_token='<nope>'"):
    tokenizer_lib.load(tok_dir, eos_token='<nope>')


def test_plain_prompt_has_one_bos_and_no_eos(plain):
  ids = plain.encode(TEXT)
  assert ids == [2, *plain.hf.encode(TEXT, add_special_tokens=False)]
  assert ids == plain.hf.encode(TEXT)  # what the tokenizer itself does
  assert plain.prompt_text(ids) == TEXT
  assert plain.encode_batch([TEXT, 'x']) == [ids, plain.encode('x')]


def test_chat_template_single_user_turn_with_generation_prompt(chat):
  ids = chat.encode(TEXT)
  expected = chat.hf.apply_chat_template(
    [{'role': 'user', 'content': TEXT}], tokenize=True, add_generation_prompt=True
  )['input_ids']
  assert ids == list(expected)
  assert ids.count(chat.ids.bos_id) == 1 and ids[0] == chat.ids.bos_id  # template's BOS only
  assert chat.hf.decode(ids) == (
    f'<bos><start_of_turn>user\n{TEXT}<end_of_turn>\n<start_of_turn>model\n'
  )
  assert chat.prompt_text(ids) == TEXT  # the user's text back, markup stripped


def test_chat_template_missing_is_a_config_error(tmp_path):
  path = hx.make_tokenizer_dir(tmp_path, chat_template=False)
  with pytest.raises(ConfigError, match=r'tokenizer\.chat_template=True .* no chat template'):
    tokenizer_lib.load(path, chat_template=True)


def test_missing_paths_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"config\.tokenizer\.path='' is invalid"):
    tokenizer_lib.load('')
  with pytest.raises(ConfigError, match=r'config\.tokenizer\.path=.*nope.* no such directory'):
    tokenizer_lib.load(tmp_path / 'nope')
  with pytest.raises(ConfigError, match=r'config\.reward\.tokenizer_path=.* no tokenizer could'):
    tokenizer_lib.load(tmp_path, path_field='reward.tokenizer_path')


def test_truncate_text_keeps_a_token_prefix(plain):
  for k in (0, 1, 3, 5, 100):
    cut = plain.truncate_text(TEXT, k)
    assert TEXT.startswith(cut)
    assert len(plain.hf.encode(cut, add_special_tokens=False)) <= k
  assert plain.truncate_text(TEXT, 100) == TEXT


def test_encode_conversation(plain, chat):
  prompt, response = 'Summary:', ' The cat sat.'
  body = plain.hf.encode(prompt + response, add_special_tokens=False)
  assert plain.encode_conversation(prompt, response, ended=True) == [2, *body, 1]
  assert plain.encode_conversation(prompt, response, ended=False) == [2, *body]
  text = chat.hf.decode(chat.encode_conversation(prompt, response, ended=False))
  assert text == (
    '<bos><start_of_turn>user\nSummary:<end_of_turn>\n'
    '<start_of_turn>model\nThe cat sat.<end_of_turn>\n'
  )


def test_check_vocab(plain):
  tokenizer_lib.check_vocab(plain, plain.vocab_size, 'model.hf_checkpoint')
  with pytest.raises(ConfigError, match=r'config\.model\.hf_checkpoint: .* vocab_size 10'):
    tokenizer_lib.check_vocab(plain, 10, 'model.hf_checkpoint')
