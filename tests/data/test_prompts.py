"""Prompt streams: TFDS (mocked, no TensorFlow) and JSONL sources, length policy, seeded
order, per-process slices and resumption from a saved position."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bond_jax.data import prompts as data
from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.types import ConfigError
from tests import hf_fixtures as hx

TEMPLATE = 'Summarize:\n{text}\nSummary:'
TEXTS = [f'document number {i} about the river' for i in range(10)]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tokenizer_lib.load(hx.make_tokenizer_dir(tmp_path_factory.mktemp('tok')))


def _stream(tok, texts=TEXTS, **kw):
  args = dict(max_prompt_len=48, global_batch=4, prompt_template=TEMPLATE, shuffle_seed=0)
  return data.PromptStream(texts, tok, **{**args, **kw})


def _rows(prompt_BxP, valid_BxP):
  return [tuple(p[v].tolist()) for p, v in zip(prompt_BxP, valid_BxP, strict=True)]


def _data_cfg(**overrides):
  fields = dict(
    source='jsonl',
    tfds_name='',
    tfds_data_dir='',
    split='train',
    eval_split='',
    text_field='',
    jsonl_path='',
    eval_jsonl_path='',
    jsonl_field='prompt',
    prompt_template=TEMPLATE,
    max_prompt_len=48,
    overlong='drop',
    shuffle_seed=0,
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def test_batches_are_left_padded_prompt_ids(tok):
  prompt, valid = _stream(tok, shuffle=False).next_batch()
  assert prompt.shape == valid.shape == (4, 48)
  assert prompt.dtype == np.int32 and valid.dtype == bool
  for i, (p, v) in enumerate(zip(prompt, valid, strict=True)):
    ids = tok.encode(TEMPLATE.replace('{text}', TEXTS[i]))
    n = len(ids)
    assert v.tolist() == [False] * (48 - n) + [True] * n  # left padding, valid at the right
    assert p[-n:].tolist() == ids and (p[:-n] == tok.ids.pad_id).all()


def test_tfds_mock_source_without_tensorflow(tok):
  with hx.mock_tfds(num_examples=6):
    texts = data.tfds_texts('xsum', 'train', 'document')
    assert len(texts) == 6 and all(isinstance(texts[i], str) for i in range(6))
    cfg = _data_cfg(
      source='tfds', tfds_name='xsum', text_field='document', max_prompt_len=64, overlong='truncate'
    )
    stream = data.from_config(cfg, tok, 0, 1, global_batch=3)
    prompt, valid = stream.next_batch()
    assert prompt.shape == (3, 64)
    order = np.random.default_rng([0, 0]).permutation(6)
    for i, row in enumerate(_rows(prompt, valid)):
      text = tok.prompt_text(row)
      assert text.startswith('Summarize:\n') and text.endswith('\nSummary:')
      assert texts[int(order[i])].startswith(text[len('Summarize:\n') : -len('\nSummary:')])
    with pytest.raises(ConfigError, match=r"config\.data\.text_field='body' is invalid.*document"):
      data.tfds_texts('xsum', 'train', 'body')
  with pytest.raises(ConfigError, match=r"config\.data\.tfds_name='no_such_dataset'"):
    data.tfds_texts('no_such_dataset', 'train', 'text')


def test_jsonl_source(tok, tmp_path):
  path = hx.write_jsonl(tmp_path / 'p.jsonl', TEXTS)
  assert data.jsonl_texts(str(path), 'prompt') == TEXTS
  stream = data.from_config(_data_cfg(jsonl_path=str(path)), tok, 0, 1, global_batch=4)
  ref = _stream(tok)
  for _ in range(3):
    assert _rows(*stream.next_batch()) == _rows(*ref.next_batch())


class TinyTexts(tfds.core.GeneratorBasedBuilder):
  """A real TFDS dataset of 5 + 3 texts, prepared as array_record without TensorFlow."""

  # A dotted module sends TFDS's code_path to importlib_resources, which is not installed.
  __module__ = 'test_prompts'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({'text': tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(5), 'validation': self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'text': f'text number {i}'}


def test_tfds_unknown_split_names_the_available_ones(tmp_path):
  TinyTexts(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  assert data.tfds_texts('tiny_texts', 'validation', 'text', str(tmp_path))[0].startswith('text')
  with pytest.raises(
    ConfigError,
    match=r"^config\.data\.split='tset' is invalid: TFDS tiny_texts in .* has the splits "
    r"\['train', 'validation'\]\.$",
  ):
    data.tfds_texts('tiny_texts', 'tset', 'text', str(tmp_path))
  cfg = _data_cfg(
    source='tfds', tfds_name='tiny_texts', tfds_data_dir=str(tmp_path), eval_split='test',
    text_field='text',
  )  # fmt: skip
  with pytest.raises(ConfigError, match=r"^config\.data\.eval_split='test' is invalid"):
    data.source_texts(cfg, eval_split=True)


def test_jsonl_errors_name_field_and_line(tmp_path):
  with pytest.raises(ConfigError, match=r"config\.data\.jsonl_path='' is invalid"):
    data.jsonl_texts('', 'prompt')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "a"}\n\n{"prompt": \n')
  with pytest.raises(ConfigError, match=r'bad\.jsonl:3: not valid JSON'):
    data.jsonl_texts(str(bad), 'prompt')
  bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
  with pytest.raises(ConfigError, match=r"config\.data\.jsonl_field='prompt'.*bad\.jsonl:2"):
    data.jsonl_texts(str(bad), 'prompt')
  bad.write_text('{"prompt": "a"}\n["prompt"]\n')
  with pytest.raises(ConfigError, match=r'bad\.jsonl:2: a JSON list, not an object'):
    data.jsonl_texts(str(bad), 'prompt')
  bad.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
  with pytest.raises(ConfigError, match=r'bad\.jsonl:3: not UTF-8'):
    data.jsonl_texts(str(bad), 'prompt')
  bad.write_text('')
  with pytest.raises(
    ConfigError, match=r"jsonl_path='.*bad\.jsonl' is invalid: no examples \(the file is empty\)"
  ):
    data.jsonl_texts(str(bad), 'prompt')
  bad.write_text('\n  \n')
  with pytest.raises(ConfigError, match=r'no examples \(its 2 lines are blank\)'):
    data.jsonl_texts(str(bad), 'prompt')


def test_overlong_drop_and_truncate(tok):
  long_text = 'the river ' * 40
  texts = ['short one', long_text, 'short two', 'short three']
  dropped = _stream(tok, texts, global_batch=3, shuffle=False)
  rows = _rows(*dropped.next_batch())
  assert [tok.prompt_text(r) for r in rows] == [
    TEMPLATE.replace('{text}', t) for t in ('short one', 'short two', 'short three')
  ]
  assert dropped.num_dropped == 1

  cut = _stream(tok, texts, global_batch=2, overlong='truncate', shuffle=False)
  _, row = _rows(*cut.next_batch())
  assert cut.num_dropped == 0 and row == tuple(cut.encode(long_text))
  assert 40 <= len(row) <= 48  # filled up to the limit, not emptied
  text = tok.prompt_text(row)
  assert text.startswith('Summarize:\n') and text.endswith('\nSummary:')  # template kept
  assert long_text.startswith(text[len('Summarize:\n') : -len('\nSummary:')])

  with pytest.raises(ConfigError, match=r'config\.data\.max_prompt_len=4 is invalid.*template'):
    _stream(tok, texts, max_prompt_len=4, overlong='truncate').next_batch()
  with pytest.raises(
    ConfigError,
    match=r'max_prompt_len=4 .*no prompt of prompts\.jsonl fits \(the shortest takes \d+ tokens',
  ):
    _stream(tok, texts, max_prompt_len=4, source='prompts.jsonl').next_batch()


def test_shuffle_is_seeded_and_epochwise(tok):
  a, b, c = (
    _stream(tok, global_batch=5),
    _stream(tok, global_batch=5),
    _stream(tok, global_batch=5, shuffle_seed=1),
  )
  epochs_a = [_rows(*a.next_batch()) + _rows(*a.next_batch()) for _ in range(2)]
  epochs_b = [_rows(*b.next_batch()) + _rows(*b.next_batch()) for _ in range(2)]
  epoch_c = _rows(*c.next_batch()) + _rows(*c.next_batch())
  assert epochs_a == epochs_b  # same seed, same order
  assert epoch_c != epochs_a[0]  # another seed, another order
  assert epochs_a[0] != epochs_a[1]  # a fresh permutation per epoch
  everything = sorted(_rows(*_stream(tok, global_batch=10, shuffle=False).next_batch()))
  assert sorted(epochs_a[0]) == sorted(epochs_a[1]) == sorted(epoch_c) == everything


def test_processes_take_disjoint_slices_of_the_global_batch(tok):
  texts = [*TEXTS, 'the river ' * 40]  # one overlong prompt, dropped on every host alike
  whole = _stream(tok, texts, global_batch=4)
  hosts = [_stream(tok, texts, global_batch=4, process_index=i, process_count=2) for i in range(2)]
  seen: list[set] = [set(), set()]
  for step in range(4):  # 10 usable prompts: the third batch crosses into epoch 1
    glob = _rows(*whole.next_batch())
    parts = [_rows(*h.next_batch()) for h in hosts]
    assert [len(p) for p in parts] == [2, 2]
    assert parts[0] + parts[1] == glob  # together the hosts cover the global batch
    assert hosts[0].state() == hosts[1].state() == whole.state()
    if step < 2:
      for s, part in zip(seen, parts, strict=True):
        s.update(part)
  assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]  # disjoint within an epoch
  with pytest.raises(ConfigError, match=r'train\.batch_size=3 .*divisible'):
    _stream(tok, global_batch=3, process_count=2)


def test_restored_stream_continues_with_the_next_unseen_batch(tok):
  uninterrupted = _stream(tok, global_batch=3)
  expected = [_rows(*uninterrupted.next_batch()) for _ in range(6)]
  first = _stream(tok, global_batch=3)
  seen = [_rows(*first.next_batch()) for _ in range(4)]  # into epoch 1 (10 prompts)
  saved = json.loads(json.dumps(first.state()))  # what a checkpoint stores
  assert saved['epoch'] == 1
  resumed = _stream(tok, global_batch=3)
  resumed.restore(saved)
  assert seen + [_rows(*resumed.next_batch()) for _ in range(2)] == expected
  with pytest.raises(ValueError, match='shuffle_seed'):
    _stream(tok, shuffle_seed=5).restore(saved)
  with pytest.raises(ValueError, match='num_examples'):
    _stream(tok, TEXTS[:5]).restore(saved)


def test_eval_prompts_in_stored_order(tok, tmp_path):
  train = hx.write_jsonl(tmp_path / 'train.jsonl', TEXTS)
  held_out = hx.write_jsonl(tmp_path / 'eval.jsonl', ['held out a', 'held out b', 'held out c'])
  cfg = _data_cfg(jsonl_path=str(train), eval_jsonl_path=str(held_out))
  rows = _rows(*data.eval_prompts(cfg, tok, 2))
  assert [tok.prompt_text(r) for r in rows] == [
    TEMPLATE.replace('{text}', f'held out {c}') for c in 'ab'
  ]
  with pytest.raises(ConfigError, match=r'config\.eval\.num_prompts=5 .* only 3'):
    data.eval_prompts(cfg, tok, 5)


def test_buckets_pad_a_batch_to_its_longest_prompt_rounded_up(tok):
  texts = ['a', 'a b c d e f g h i j k l m n o p', 'b', 'c', 'd', 'e', 'f', 'g']
  whole = _stream(tok, texts, shuffle=False, global_batch=4)
  halves = [
    _stream(tok, texts, shuffle=False, global_batch=4, bucket=8, process_index=i, process_count=2)
    for i in range(2)
  ]
  lengths = [len(tok.encode(TEMPLATE.replace('{text}', t))) for t in texts]
  for first in (True, False):  # batch 1 holds the long prompt, batch 2 only short ones
    want_width = -(-max(lengths[:4] if first else lengths[4:]) // 8) * 8
    full = whole.next_batch()
    parts = [h.next_batch() for h in halves]
    assert want_width < 48
    for prompt, _ in parts:  # both processes pad to the global batch's width
      assert prompt.shape == (2, want_width)
    # The same prompts, only less left padding.
    assert _rows(*full) == _rows(*parts[0]) + _rows(*parts[1])
  with pytest.raises(ConfigError, match=r'config\.data\.prompt_bucket=-1 is invalid'):
    _stream(tok, bucket=-1)
