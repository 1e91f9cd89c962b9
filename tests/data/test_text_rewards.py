"""reward.source='python': a function of decoded text, run on the host inside the compiled
step. Checked against an exact twin over token ids, on sampled responses, jitted and in a
sampler's micro-batches; bad functions stop with one line naming the function."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.data import rewards, text_rewards
from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.models import hf, sampling, sharding
from bond_jax.run import config as config_lib
from bond_jax.run import guards
from bond_jax.types import ConfigError
from tests import hf_fixtures as hx
from tests import text_rewards as tr
from tests.data.test_rewards import ROOT, _batch, _reward_cfg


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tokenizer_lib.load(hx.make_tokenizer_dir(tmp_path_factory.mktemp('tok')))


def _python(tok, name, mesh=None):
  cfg = _reward_cfg(source='python', function=f'tests.text_rewards:{name}')
  fn, params = rewards.make_reward(cfg, tok, mesh=mesh)
  assert params is None
  return fn


def test_equals_its_twin_on_sampled_responses(tok, tmp_path):
  """Responses sampled from a random tiny policy (any ids, partial UTF-8 included), scored
  by the text function inside jit and by the twin over ids: the same numbers."""
  policy = hx.make_policy_dir(tmp_path / 'policy', tok.path)
  cfg, params = hf.load_params(policy)
  prompt, valid = _batch(tok)[:2]
  sp = sampling.SamplingParams(max_new_tokens=12, eos_id=tok.ids.eos_id, pad_id=tok.ids.pad_id)
  out = sampling.sample(cfg, params, prompt, valid, jax.random.key(0), sp, num_samples=4)
  prompt4, valid4 = np.repeat(prompt, 4, 0), np.repeat(valid, 4, 0)
  batch = prompt4, valid4, out.tokens_BxG, out.mask_BxG
  got = jax.jit(_python(tok, 'letter_score'))(None, *batch)
  want = tr.letter_twin(tok)(None, *batch)
  assert got.dtype == jnp.float32 and got.shape == (16,)
  np.testing.assert_array_equal(got, want)
  assert len(set(np.asarray(got).tolist())) > 3  # the check can fail: rewards differ by row
  # Under lax.map (the sampler's micro-batches of prompts) too.
  mapped = jax.jit(
    lambda *b: jax.lax.map(
      lambda rows: _python(tok, 'letter_score')(None, *rows),
      tuple(x.reshape(4, 4, *x.shape[1:]) for x in b),
    ).reshape(-1)
  )(*batch)
  np.testing.assert_array_equal(mapped, want)


def test_one_device_mesh_path_equals_default_device(tok):
  batch = _batch(tok)
  mesh = sharding.make_mesh(1, 1, 1)
  got = jax.jit(_python(tok, 'letter_score', mesh=mesh))(None, *batch)
  np.testing.assert_array_equal(got, tr.letter_twin(tok)(None, *batch))


def _run_time_error(fn, batch) -> str:
  with pytest.raises(guards.RunError) as e, guards.reward_failures():
    jax.block_until_ready(jax.jit(fn)(None, *batch))
  return str(e.value)


@pytest.mark.parametrize(
  'name, problem',
  [
    ('wrong_length', r'returned 3 values for 4 responses; return one float each'),
    ('not_finite', r"returned nan for response 0 \('.*'\); rewards must be finite"),
    ('raises', r'raised ZeroDivisionError: float division by zero'),
    ('not_numbers', r'returned list, not a list of floats'),
  ],
)
def test_bad_functions_stop_with_one_line(tok, name, problem):
  batch = _batch(tok)
  fn = _python(tok, name)
  with pytest.raises(ConfigError) as e:  # at start-up, before anything compiles
    rewards.probe(fn, *batch[:2])
  message = str(e.value)
  assert '\n' not in message
  assert f"reward.function='tests.text_rewards:{name}' " in message
  assert 'called at start-up' in message
  if name != 'not_finite':  # start-up responses are empty; the prompts decide NaN
    assert re.search(problem, message)
  # In a compiled step: JAX's error around the callback becomes the same one line.
  message = _run_time_error(fn, batch)
  assert '\n' not in message and message.startswith(f"reward.function='tests.text_rewards:{name}'")
  assert re.search(problem, message)


def test_a_failure_after_start_up_is_one_line(tok):
  batch = _batch(tok)
  fn = _python(tok, 'fails_on_long_responses')
  rewards.probe(fn, *batch[:2])  # empty responses: fine
  message = _run_time_error(fn, batch)
  assert message == (
    "reward.function='tests.text_rewards:fails_on_long_responses' raised ValueError: "
    'the scorer lost its connection'
  )


def test_other_errors_pass_through(tok):
  """Only a reward function's failure is rewritten; anything else JAX raises is not."""
  with pytest.raises(ZeroDivisionError), guards.reward_failures():
    raise ZeroDivisionError('not ours')


def test_function_names(tmp_path):
  def fails(spec, match):
    with pytest.raises(ConfigError, match=match):
      rewards.load_function(spec)

  fails('text_rewards.vader_sentiment', r"name a function as 'module:function'")
  fails('no_such_module_xyz:f', r'importing no_such_module_xyz failed \(ModuleNotFoundError')
  fails('tests.text_rewards:nothing', r'tests.text_rewards has no function nothing')
  fails(f'{tmp_path}/missing.py:f', r'no such file')
  path = tmp_path / 'my_reward.py'
  path.write_text('def shout(prompts, responses):\n  return [r.count("!") for r in responses]\n')
  fn = rewards.load_function(f'{path}:shout')
  assert fn(['x', 'y'], ['hi!!', '']) == [2, 0]
  (tmp_path / 'broken.py').write_text('import nothing_here_xyz\n')
  fails(f'{tmp_path}/broken.py:f', r'failed \(ModuleNotFoundError: No module named')


def test_validate_names_the_function(tmp_path):
  c = config_lib.load_config_file(ROOT / 'configs' / 'jbond_gemma3_270m_sentiment.py')
  assert (c.reward.source, c.reward.function) == (
    'python',
    'bond_jax.data.text_rewards:vader_sentiment',
  )
  tok_dir = hx.make_tokenizer_dir(tmp_path / 't')
  c.model.hf_checkpoint = str(hx.make_policy_dir(tmp_path / 'p', tok_dir))
  c.model.preset = ''
  config_lib.validate_real(c)
  c.reward.function = 'tests.text_rewards:nothing'
  with pytest.raises(ConfigError, match=r"config\.reward\.function='tests.text_rewards:nothing'"):
    config_lib.validate_real(c)


def test_vader_sentiment_reads_the_response():
  pytest.importorskip('vaderSentiment', reason=text_rewards.INSTALL)
  scores = text_rewards.vader_sentiment(
    ['The food was'] * 4, [' wonderful, I loved it.', ' awful and cold.', ' served at noon.', '']
  )
  assert scores[0] > 0.5 and scores[1] < -0.3 and scores[2] == 0.0 and scores[3] == 0.0


def test_shipped_prompt_sets_are_neutral_for_vader():
  """The prompts stop before the opinion: VADER scores each exactly 0 alone, so the reward
  measures what the model adds."""
  pytest.importorskip('vaderSentiment', reason=text_rewards.INSTALL)
  folder = ROOT / 'bond_jax' / 'data' / 'prompt_sets'
  texts = [
    json.loads(line)['prompt']
    for name in ('sentiment_train', 'sentiment_heldout')
    for line in (folder / f'{name}.jsonl').read_text().splitlines()
  ]
  assert len(texts) == 1200
  assert text_rewards.vader_sentiment(texts, texts) == [0.0] * 1200
