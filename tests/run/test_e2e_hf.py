"""End to end on real-model plumbing: a saved tiny Hugging Face Gemma policy, a tiny HF
reward model, and prompts from TFDS (mock data) or a local JSONL file, through the same
`trainer.run` as every run: 2 J-BOND steps, checkpoints with the data position, the table."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from bond_jax.models import hf
from bond_jax.run import checkpoint, evaluation
from bond_jax.run import config as config_lib
from bond_jax.run import loop as trainer
from tests import hf_fixtures, text_rewards

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def artefacts(tmp_path_factory):
  d = tmp_path_factory.mktemp('hf')
  tok = hf_fixtures.make_tokenizer_dir(d / 'tokenizer')
  policy = hf_fixtures.make_policy_dir(d / 'policy', tok)
  reward = hf_fixtures.make_reward_dir(d / 'reward', tok)
  texts = [
    'the cat sat on the mat',
    'summarise the news today',
    'a short story about rain',
    'why is the sky blue',
    'list three fruits',
    'write a haiku about code',
  ]
  jsonl = hf_fixtures.write_jsonl(d / 'prompts.jsonl', texts)
  return {'policy': str(policy), 'reward': str(reward), 'jsonl': str(jsonl)}


def _config(artefacts, source: str):
  c = config_lib.load_config_file(ROOT / 'configs' / 'jbond_gemma2b.py')
  c.model.preset = ''  # the tiny fixture is no preset: take the checkpoint's architecture
  c.model.hf_checkpoint = artefacts['policy']
  c.reward.checkpoint = artefacts['reward']
  c.model.dtype = c.model.param_dtype = c.reward.dtype = 'float32'
  c.data.source = source
  if source == 'jsonl':
    c.data.jsonl_path = artefacts['jsonl']
  else:
    c.data.tfds_name, c.data.split, c.data.text_field = 'xsum', 'train', 'document'
    c.data.overlong = 'truncate'
  c.data.max_prompt_len = 48
  c.mesh.data = c.mesh.fsdp = c.mesh.model = 1
  c.train.num_steps = 2
  c.train.batch_size = 4
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 0
  c.sampling.max_new_tokens = 6
  # The config's memory knobs, scaled to this batch: 2 prompts sampled at a time, 2 rows per
  # gradient micro-batch, log-probs 3 positions at a time.
  c.sampling.micro_batch_size, c.train.micro_batch_size, c.train.logprob_chunk = 2, 2, 3
  c.ckpt.every = 1
  c.eval.num_prompts, c.eval.samples_per_prompt = 2, 4
  c.eval.bon_ns, c.eval.policy_samples_per_prompt = (2, 4), 2
  c.log.tensorboard = c.log.progress = False
  return c


@pytest.mark.parametrize('source', ['jsonl', 'tfds'])
def test_two_jbond_steps_from_hf_checkpoints(artefacts, source, tmp_path):
  c = _config(artefacts, source)
  if source == 'tfds':
    with hf_fixtures.mock_tfds(num_examples=12):
      summary = trainer.run(c, tmp_path)
  else:
    summary = trainer.run(c, tmp_path)

  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2]
  for r in rows:
    for k in ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss', 'grad_norm'):
      assert math.isfinite(r[k]), (k, r)
    assert r['grad_norm'] > 0
  # The policy starts as pi_ref; pi_ref is kept in bfloat16 (model.reference_dtype) and these
  # test weights are float32, so their log-likelihoods differ by bfloat16 rounding only.
  assert rows[0]['kl_ref'] == pytest.approx(0.0, abs=1e-3)
  assert summary['step'] == 2 and math.isfinite(summary['reward_policy'])
  assert set(summary['reward_bon']) == {'2', '4'}

  # The checkpoint holds the state and, in its metadata, where the prompt stream stands.
  ckpts = checkpoint.Checkpoints(tmp_path / 'checkpoints', 1, 2)
  meta = ckpts._ckpt.metadata(ckpts._ckpt.latest).custom_metadata
  ckpts.close()
  assert (
    meta['data_position']['index']
    + meta['data_position']['epoch'] * meta['data_position']['num_examples']
    >= 2 * c.train.batch_size
  )

  if source == 'jsonl':  # read back for evaluation: pi_ref, left out, is reloaded and checked
    _, _, state = evaluation.load_workdir(tmp_path)
    _, want = hf.load_params(c.model.hf_checkpoint, cfg=config_lib.model_config(c))
    same = lambda got, w: np.testing.assert_array_equal(got, np.asarray(w).astype(got.dtype))
    jax.tree.map(same, state.ref_params, want)  # in model.reference_dtype (bfloat16 here)
    assert jax.tree.leaves(state.ref_params)[0].dtype == c.model.reference_dtype


def test_missing_paths_fail_before_loading(artefacts, tmp_path):
  c = _config(artefacts, 'jsonl')
  c.model.hf_checkpoint = ''
  with pytest.raises(config_lib.ConfigError, match=r'model\.hf_checkpoint'):
    trainer.run(c, tmp_path)
  c = _config(artefacts, 'jsonl')
  c.reward.checkpoint = str(tmp_path / 'nope')
  with pytest.raises(config_lib.ConfigError, match=r'reward\.checkpoint'):
    trainer.run(c, tmp_path)


def _sentiment_config(artefacts, arg=None):
  """configs/jbond_gemma3_270m_sentiment.py on the tiny fixture, with a text reward that has
  an exact twin over ids (tests/text_rewards.py)."""
  c = config_lib.load_config_file(ROOT / 'configs' / 'jbond_gemma3_270m_sentiment.py', arg)
  c.model.preset = ''
  c.model.hf_checkpoint = artefacts['policy']
  c.reward.function = 'tests.text_rewards:letter_score'
  c.train.num_steps, c.train.batch_size = 2, 4
  c.sampling.max_new_tokens, c.data.max_prompt_len = 6, 32
  c.eval.num_prompts, c.eval.samples_per_prompt, c.eval.bon_ns = 4, 4, (2, 4)
  c.eval.policy_samples_per_prompt, c.eval.kl_n = 2, 4
  c.eval.every, c.eval.micro_batch_size, c.eval.show_examples = 0, 2, 2
  c.log.tensorboard = c.log.progress = False
  return c


def test_text_reward_run_shows_examples_and_the_same_table_in_micro_batches(artefacts, tmp_path):
  c = _sentiment_config(artefacts)
  summary = trainer.run(c, tmp_path)
  assert summary['step'] == 2
  assert json.loads((tmp_path / 'summary.json').read_text())['examples'] == summary['examples']
  (first, second) = summary['examples']
  prompts = [json.loads(line)['prompt'] for line in open(c.data.eval_jsonl_path)][:2]
  assert [first['prompt'], second['prompt']] == prompts  # the held-out prompts, as text
  for row in summary['examples']:  # the text shown is the text the reward scored
    want = text_rewards.letter_score([row['prompt']] * 2, [row['pi_ref'], row['policy']])
    assert [row['pi_ref_reward'], row['policy_reward']] == want
  assert summary['nll_ref_per_token_policy'] > 0 and summary['nll_ref_per_token_ref'] > 0
  # Scored two prompts at a time or all at once: the same samples, the same table.
  _, setup, state = evaluation.load_workdir(tmp_path)
  c.eval.micro_batch_size = 0
  whole = evaluation.table(c, setup, state.params, state.ref_params, examples=2)
  for key in ('reward_ref', 'reward_policy', 'kl_policy_ref', 'win_rate', 'kl_bwd', 'kl_fwd'):
    assert whole[key] == pytest.approx(summary[key], rel=1e-4, abs=1e-5), key
  assert whole['examples'] == summary['examples']


def test_failing_text_reward_stops_the_run_with_one_line(artefacts, tmp_path):
  c = _sentiment_config(artefacts, 'reinforce:0.1')
  assert (c.bond.algorithm, c.bond.beta_rl) == ('reinforce', 0.1)
  c.reward.function = 'tests.text_rewards:fails_on_long_responses'
  with pytest.raises(trainer.RunError) as e:
    trainer.run(c, tmp_path)
  assert str(e.value) == (
    "reward.function='tests.text_rewards:fails_on_long_responses' raised ValueError: the "
    'scorer lost its connection; the run stopped: rerun the command to resume it'
  )
