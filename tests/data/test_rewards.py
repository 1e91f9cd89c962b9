"""Reward sources: a reward model reading the policy's ids, or re-tokenized text; programmatic
rewards; parameters passed, never baked into the jitted function; config errors by field."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from bond_jax.data import prompts as data
from bond_jax.data import rewards
from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.models import decoder, hf, reward_model, sharding
from bond_jax.run import config as config_lib
from bond_jax.run.config import load_config_file
from bond_jax.types import ConfigError
from tests import hf_fixtures as hx
from tests import text_rewards

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = 'Summarize:\n{text}\nSummary:'
DOCS = [
  'The cat sat on the mat.',
  'The city council voted to build a bridge.',
  'Paris is the capital of France.',
  'Scientists found the river was warmer.',
]
ANSWERS = [
  ' A cat sat.',
  ' A new bridge over the river will be built, the council said.',
  ' Paris.',
  ' The river is warmer than last year.',
]


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  tok_a = hx.make_tokenizer_dir(root / 'tok_a')
  tok_b = hx.make_tokenizer_dir(root / 'tok_b', vocab_size=300, corpus=hx.CORPUS[2:])
  return {
    'tok_a': tok_a,
    'tok_b': tok_b,
    'rm_a': hx.make_reward_dir(root / 'rm_a', tok_a),
    'rm_b': hx.make_reward_dir(root / 'rm_b', tok_b, seed=2),
  }


def _reward_cfg(**overrides):
  fields = dict(
    source='model',
    checkpoint='',
    tokenizer_path='',
    chat_template=False,
    max_len=96,
    dtype='float32',
    fn='',
    function='',
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def _batch(policy: tokenizer_lib.Tokenizer):
  """Left-padded prompts and sampler-style responses: rows 0, 2, 3 end with EOS, row 1 fills
  the whole buffer G without one (a response cut off by the buffer)."""
  stream = data.PromptStream(
    DOCS, policy, max_prompt_len=80, global_batch=4, prompt_template=TEMPLATE, shuffle=False
  )
  prompt, valid = stream.next_batch()
  ids = [policy.hf.encode(a, add_special_tokens=False) for a in ANSWERS]
  g = len(ids[1])
  response = np.full((4, g), policy.ids.pad_id, np.int32)
  mask = np.zeros((4, g), bool)
  for i, row in enumerate(ids):
    row = row if i == 1 else [*row, policy.ids.eos_id]
    assert len(row) <= g
    response[i, : len(row)], mask[i, : len(row)] = row, True
  return prompt, valid, response, mask


def _left_pad(rows, width, pad_id):
  tokens = np.full((len(rows), width), pad_id, np.int32)
  valid = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    tokens[i, width - len(r) :], valid[i, width - len(r) :] = r, True
  return tokens, valid


def test_same_tokenizer_scores_prompt_and_response_ids(dirs):
  policy = tokenizer_lib.load(dirs['tok_a'])
  fn, params = rewards.make_reward(_reward_cfg(checkpoint=str(dirs['rm_a'])), policy)
  batch = _batch(policy)
  got = jax.jit(fn)(params, *batch)
  cfg, _ = hf.load_reward_params(dirs['rm_a'])
  want = reward_model.score(cfg, params, *decoder.concat_prompt_response(*batch))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # jit vs eager rounding

  # transformers' model on the unpadded text reads the same sequences (holes are masked),
  # up to and including EOS where the response ended.
  torch = pytest.importorskip('torch')
  import transformers

  model = transformers.AutoModelForSequenceClassification.from_pretrained(dirs['rm_a']).eval()
  prompt, valid, response, mask = batch
  with torch.no_grad():
    ref = [
      model(input_ids=torch.tensor([[*p[v], *r[m]]])).logits[0, 0].item()
      for p, v, r, m in zip(prompt, valid, response, mask, strict=True)
    ]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('chat', [False, True], ids=['plain', 'chat'])
def test_other_tokenizer_scores_the_retokenized_text(dirs, chat):
  policy = tokenizer_lib.load(dirs['tok_a'], chat_template=chat)
  cfg = _reward_cfg(
    checkpoint=str(dirs['rm_b']), tokenizer_path=str(dirs['tok_b']), chat_template=chat
  )
  fn, params = rewards.make_reward(cfg, policy)
  got = jax.jit(fn)(params, *_batch(policy))

  # The same texts, tokenized by the reward tokenizer directly.
  reward_tok = tokenizer_lib.load(dirs['tok_b'], chat_template=chat)
  assert not reward_tok.same_vocab(policy)
  rows = [
    reward_tok.encode_conversation(
      TEMPLATE.replace('{text}', d), a.strip() if chat else a, ended=i != 1
    )
    for i, (d, a) in enumerate(zip(DOCS, ANSWERS, strict=True))
  ]
  assert max(map(len, rows)) <= cfg.max_len
  rm_cfg, _ = hf.load_reward_params(dirs['rm_b'])
  want = reward_model.score(rm_cfg, params, *_left_pad(rows, cfg.max_len, reward_tok.ids.pad_id))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if not chat:  # EOS appended exactly for finished responses
    assert [r[-1] == reward_tok.ids.eos_id for r in rows] == [True, False, True, True]


def test_retokenize_truncation_keeps_bos_and_the_end(dirs):
  policy = tokenizer_lib.load(dirs['tok_a'])
  reward_tok = tokenizer_lib.load(dirs['tok_b'])
  batch = _batch(policy)
  full, _ = rewards.retokenize(policy, reward_tok, 200, *batch)
  short, valid = rewards.retokenize(policy, reward_tok, 16, *batch)
  assert valid.all() and (short[:, 0] == reward_tok.ids.bos_id).all()
  np.testing.assert_array_equal(short[:, 1:], full[:, -15:])


def test_reward_params_are_arguments_not_constants(dirs):
  policy = tokenizer_lib.load(dirs['tok_a'])
  fn, params = rewards.make_reward(_reward_cfg(checkpoint=str(dirs['rm_a'])), policy)
  batch = _batch(policy)
  big = params['decoder']['embedder']['embedding'].size

  def const_sizes(jaxpr):
    return [np.size(c) for c in jaxpr.consts]

  assert max(const_sizes(jax.make_jaxpr(fn)(params, *batch)), default=0) < big
  # The check can fail: a closure over the parameters bakes them in.
  assert max(const_sizes(jax.make_jaxpr(lambda *b: fn(params, *b))(*batch))) >= big


def test_mesh_path_equals_default_device(dirs):
  policy = tokenizer_lib.load(dirs['tok_a'])
  cfg = _reward_cfg(checkpoint=str(dirs['rm_b']), tokenizer_path=str(dirs['tok_b']))
  batch = _batch(policy)
  fn, params = rewards.make_reward(cfg, policy)
  fn_mesh, params_mesh = rewards.make_reward(cfg, policy, mesh=sharding.make_mesh(1, 1, 1))
  np.testing.assert_allclose(jax.jit(fn_mesh)(params_mesh, *batch), fn(params, *batch), rtol=1e-5)


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 8)
    import ml_collections, numpy as np
    from bond_jax.data import rewards
    from bond_jax.models import sharding
    from bond_jax.data import tokenizer
    args = json.loads(sys.argv[1])
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    policy = tokenizer.load(args['policy'])
    batch = [np.asarray(x) for x in args['batch']]
    batch[0], batch[2] = batch[0].astype(np.int32), batch[2].astype(np.int32)
    batch[1], batch[3] = batch[1].astype(bool), batch[3].astype(bool)
    placed = [jax.device_put(x, sharding.data_sharding(mesh)) for x in batch]
    out = {}
    for name, cfg in args['cfgs'].items():
      fn, params = rewards.make_reward(ml_collections.ConfigDict(cfg), policy, mesh=mesh)
      out[name] = np.asarray(jax.jit(fn)(params, *placed)).tolist()
    print(json.dumps(out))
""")


def test_sharded_reward_on_a_2x2x2_mesh_matches_one_device(dirs):
  """Reward-model parameters split over 'fsdp' and 'model', rows over 'data' and 'fsdp'; a
  python reward's rows handed to the host by each device (`rewards.on_host`)."""
  policy = tokenizer_lib.load(dirs['tok_a'])
  batch = _batch(policy)
  cfgs = {
    'same': _reward_cfg(checkpoint=str(dirs['rm_a'])),
    'retok': _reward_cfg(checkpoint=str(dirs['rm_b']), tokenizer_path=str(dirs['tok_b'])),
    'python': _reward_cfg(source='python', function='tests.text_rewards:letter_score'),
  }
  args = {
    'policy': str(dirs['tok_a']),
    'batch': [x.tolist() for x in batch],
    'cfgs': {k: c.to_dict() for k, c in cfgs.items()},
  }
  proc = subprocess.run(
    [sys.executable, '-c', _MESH_SCRIPT, json.dumps(args)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  sharded = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, cfg in cfgs.items():
    fn, params = rewards.make_reward(cfg, policy)
    np.testing.assert_allclose(
      sharded[name], fn(params, *batch), rtol=1e-5, atol=1e-5, err_msg=name
    )
  # The text function, its rows handed over by 8 devices, equals its twin over ids exactly.
  np.testing.assert_array_equal(sharded['python'], text_rewards.letter_twin(policy)(None, *batch))


def test_programmatic_rewards(dirs):
  policy = tokenizer_lib.load(dirs['tok_a'])
  assert (policy.ids.pad_id, policy.ids.eos_id, policy.ids.bos_id) == (0, 1, 2)
  prompt = np.array([[0, 2, 7, 8, 9], [2, 5, 6, 7, 8]], np.int32)
  valid = prompt != 0
  response = np.array([[7, 8, 4, 1], [5, 6, 7, 8]], np.int32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], bool)

  def run(name):
    cfg = _reward_cfg(source='programmatic', fn=name)
    fn, params = rewards.make_reward(cfg, policy)
    assert params is None
    return np.asarray(jax.jit(fn)(params, prompt, valid, response, mask))

  np.testing.assert_allclose(run('copy_accuracy'), [2 / 3, 1.0])
  np.testing.assert_allclose(run('length_penalty'), [-4.0, -4.0])
  np.testing.assert_allclose(run('terminated'), [1.0, 0.0])
  with pytest.raises(ConfigError, match=r"config\.reward\.fn='bleu' is invalid"):
    run('bleu')


def test_policy_fixture_is_a_loadable_checkpoint(dirs, tmp_path):
  path = hx.make_policy_dir(tmp_path / 'policy', dirs['tok_a'])
  cfg, params = hf.load_params(path)
  tok = tokenizer_lib.load(path, chat_template=True)  # the tokenizer travels with the weights
  assert cfg.vocab_size == tok.vocab_size
  assert params['embedder']['embedding'].shape == (tok.vocab_size, 32)


def test_missing_or_inconsistent_reward_fields(dirs, tmp_path):
  policy = tokenizer_lib.load(dirs['tok_a'])
  with pytest.raises(ConfigError, match=r"config\.reward\.checkpoint='' is invalid"):
    rewards.make_reward(_reward_cfg(), policy)
  with pytest.raises(ConfigError, match=r'config\.reward\.checkpoint=.*nope.* does not exist'):
    rewards.make_reward(_reward_cfg(checkpoint=str(tmp_path / 'nope')), policy)
  with pytest.raises(ConfigError, match=r'config\.reward\.tokenizer_path=.*nope'):
    rewards.make_reward(
      _reward_cfg(checkpoint=str(dirs['rm_b']), tokenizer_path=str(tmp_path / 'nope')), policy
    )
  with pytest.raises(ConfigError, match=r'config\.reward\.chat_template=True is invalid'):
    rewards.make_reward(_reward_cfg(checkpoint=str(dirs['rm_a']), chat_template=True), policy)
  with pytest.raises(ConfigError, match=r'config\.reward\.checkpoint: .*vocab_size'):
    rewards.make_reward(_reward_cfg(checkpoint=str(dirs['rm_b'])), policy)  # B's vocab is smaller
  with pytest.raises(ConfigError, match=r"config\.reward\.source='human' is invalid"):
    rewards.make_reward(_reward_cfg(source='human'), policy)


@pytest.mark.parametrize('name', ['jbond_gemma2b', 'jbond_gemma7b', 'bond_xsum'])
def test_validate_real_names_missing_fields(dirs, tmp_path, name):
  c = load_config_file(ROOT / 'configs' / f'{name}.py')
  with pytest.raises(ConfigError, match=r"config\.model\.hf_checkpoint='' is invalid"):
    config_lib.validate_real(c)
  c.model.preset = ''  # the tiny fixture is no preset: take the checkpoint's architecture
  c.model.hf_checkpoint = str(dirs['rm_a'])  # any directory with a Gemma config.json
  if c.data.source == 'jsonl':
    with pytest.raises(ConfigError, match=r"config\.data\.jsonl_path='' is invalid"):
      config_lib.validate_real(c)
    c.data.jsonl_path = str(hx.write_jsonl(tmp_path / 'p.jsonl', DOCS))
  with pytest.raises(ConfigError, match=r"config\.reward\.checkpoint='' is invalid"):
    config_lib.validate_real(c)
  c.reward.checkpoint = str(tmp_path)
  with pytest.raises(ConfigError, match=r'config\.reward\.checkpoint=.* no config\.json'):
    config_lib.validate_real(c)
  c.reward.checkpoint = str(dirs['rm_a'])
  config_lib.validate_real(c)
  assert config_lib.tokenizer_path(c) == c.model.hf_checkpoint  # '' falls back
  c.reward.source, c.reward.fn = 'programmatic', 'nope'
  with pytest.raises(ConfigError, match=r"config\.reward\.fn='nope' is invalid"):
    config_lib.validate_real(c)


def test_xsum_config_takes_beta_from_its_argument():
  path = ROOT / 'configs' / 'bond_xsum.py'
  assert [load_config_file(path, b).bond.beta for b in ('0', '0.5', '1')] == [0.0, 0.5, 1.0]
  c = load_config_file(path)
  assert (c.bond.algorithm, c.bond.n, c.bond.num_quantile_samples, c.bond.anchor) == (
    'bond',
    8,
    16,
    'fixed',
  )
  assert (c.data.tfds_name, c.data.text_field) == ('xsum', 'document')
  with pytest.raises(ValueError, match='beta must be in'):
    load_config_file(path, '2')
