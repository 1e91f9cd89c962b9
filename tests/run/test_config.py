"""Config validation: every bad value is rejected before anything compiles, by name."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from bond_jax.models import presets, sampling
from bond_jax.run import config as config_lib
from bond_jax.run import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config(name: str = 'jbond_tiny'):
  return config_lib.load_config_file(ROOT / 'configs' / f'{name}.py')


def test_default_config_is_valid():
  config_lib.validate(load_config())


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('bond.beta', 1.5, r'bond\.beta=1\.5 .*\[0, 1\]'),
    ('bond.beta', -0.1, r'bond\.beta=-0\.1 .*\[0, 1\]'),
    ('bond.eta', 2.0, r'bond\.eta=2\.0 .*\[0, 1\]'),
    ('bond.eta', -0.5, r'bond\.eta=-0\.5 .*\[0, 1\]'),
    ('bond.gamma', -1.0, r'bond\.gamma=-1\.0 .*>= 0'),
    ('bond.n', 1, r'bond\.n=1 .*>= 2'),
    ('bond.algorithm', 'ppo', r"bond\.algorithm='ppo' .*one of"),
    ('bond.anchor', 'sometimes', r"bond\.anchor='sometimes' .*one of"),
    ('bond.quantile', 'guess', r"bond\.quantile='guess' .*one of"),
    ('bond.num_quantile_samples', 0, r'bond\.num_quantile_samples=0 .*> 0'),
    ('bond.beta_rl', -0.01, r'bond\.beta_rl=-0\.01 .*>= 0'),
    ('bond.num_policy_samples', 1, r'bond\.num_policy_samples=1 .*>= 2'),
    ('train.batch_size', 0, r'train\.batch_size=0 .*> 0'),
    ('train.batch_size', 1, r'train\.batch_size=1 .*leave-one-out'),
    ('train.num_steps', -3, r'train\.num_steps=-3 .*> 0'),
    ('sampling.max_new_tokens', 0, r'sampling\.max_new_tokens=0 .*> 0'),
    ('sampling.temperature', 0.0, r'sampling\.temperature=0\.0 .*> 0'),
    ('sampling.top_p', 0.0, r'sampling\.top_p=0\.0 .*\(0, 1\]'),
    ('sampling.top_k', -1, r'sampling\.top_k=-1 .*>= 0'),
    ('optim.learning_rate', 0.0, r'optim\.learning_rate=0\.0 .*> 0'),
    ('optim.warmup_steps', -1, r'optim\.warmup_steps=-1 .*>= 0'),
    ('optim.grad_clip_norm', -1.0, r'optim\.grad_clip_norm=-1\.0 .*>= 0'),
    ('ckpt.every', 0, r'ckpt\.every=0 .*> 0'),
    ('task.prompt_len', 0, r'task\.prompt_len=0 .*> 0'),
    ('task.keep_prob', 0.0, r'task\.keep_prob=0\.0 .*\(0, 1\]'),
    ('model.preset', 'gpt5', r"model\.preset='gpt5' .*one of"),
    ('model.preset', '', r"model\.preset='' .*one of"),  # '' is for Hugging Face runs only
    ('eval.bon_ns', (2, 64), r'eval\.bon_ns=\(2, 64\) .*samples_per_prompt'),
    ('reference.sft_steps', 0, r'reference\.sft_steps=0 .*> 0'),
    # With share_prompts (on in jbond_tiny.py), J-BOND's micro-batches hold a prompt's
    # 2 rows (its sample and its Best-of-2 row): 8 divides the batch of 128 but 3 does not.
    ('train.micro_batch_size', 3, r'train\.micro_batch_size=3 .*divisor of train\.batch_size'),
    ('eval.micro_batch_size', 7, r'eval\.micro_batch_size=7 .*divisor of eval\.num_prompts'),
    ('eval.show_examples', -1, r'eval\.show_examples=-1 .*>= 0'),
  ],
)
def test_bad_value_is_rejected_with_its_name(field, value, message):
  c = load_config()
  section, key = field.split('.')
  c[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_micro_batches_hold_whole_prompts_when_prompts_are_shared():
  """A micro-batch that would split a prompt's rows is a config error (not a silent switch
  to reading rows whole), naming the rows per prompt and the way out."""
  c = load_config()
  c.train.batch_size, c.train.micro_batch_size = 12, 3  # 3 divides 12 but splits pairs
  with pytest.raises(
    config_lib.ConfigError,
    match=r'^config\.train\.micro_batch_size=3 is invalid: with train\.share_prompts=True a '
    r"micro-batch holds whole prompts: a multiple of their 2 rows each \(bond\.algorithm='jbond'\)",
  ):
    config_lib.validate(c)
  c.train.share_prompts = False
  config_lib.validate(c)
  c.train.share_prompts, c.train.micro_batch_size = True, 4
  config_lib.validate(c)
  c.bond.algorithm, c.bond.num_policy_samples = 'reinforce', 3  # 3 rows per prompt
  with pytest.raises(config_lib.ConfigError, match=r'multiple of their 3 rows each'):
    config_lib.validate(c)


def test_a_flag_knob_must_be_a_bool():
  """`train.share_prompts` written as 1 in a config file (overrides are type-checked by
  ml_collections; a file's value is not): named, with what it takes."""
  c = load_config()
  with c.unlocked():
    del c.train['share_prompts']
    c.train.share_prompts = 1
  with pytest.raises(config_lib.ConfigError, match=r'train\.share_prompts=1 .*True or False'):
    config_lib.validate(c)
  # The tiny config turns it on, and the step gets it.
  c = load_config()
  sp = sampling.SamplingParams(max_new_tokens=c.sampling.max_new_tokens)
  cfg = presets.preset(c.model.preset)
  assert c.train.share_prompts is True
  assert config_lib.step_config(c, cfg, None, sp).share_prompts is True


def test_batch_must_split_over_the_data_axes():
  c = load_config()
  c.mesh.data, c.mesh.fsdp = 3, 1
  with pytest.raises(
    config_lib.ConfigError, match=r'train\.batch_size=128 .*mesh\.data \* mesh\.fsdp = 3'
  ):
    config_lib.validate(c, check_devices=False)


@pytest.mark.parametrize(
  'sizes, devices, expected',
  [((1, -1, 1), 8, (1, 8, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((-1, 1, 1), 1, (1, 1, 1))],
)
def test_a_minus_one_mesh_axis_takes_the_remaining_devices(sizes, devices, expected):
  c = load_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.model = sizes
  assert config_lib.mesh_shape(c, devices) == expected


@pytest.mark.parametrize(
  'sizes, message',
  [
    ((-1, -1, 1), r'only one mesh axis may be -1'),
    ((3, -1, 1), r'mesh\.fsdp=-1: the other mesh axes \(3 devices\) do not divide the 8'),
    ((4, 4, 1), r'= 16 exceeds the 8 devices'),
    ((0, 1, 1), r'mesh\.data=0 is invalid'),
  ],
)
def test_bad_mesh_sizes_are_named(sizes, message):
  c = load_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.model = sizes
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.mesh_shape(c, 8)


def test_learned_quantiles_only_with_bond_and_no_correction():
  c = load_config()
  c.bond.quantile = 'learned'
  with pytest.raises(config_lib.ConfigError, match=r"bond\.quantile='learned' .*'bond' only"):
    config_lib.validate(c)
  c.bond.algorithm = 'bond'
  config_lib.validate(c)
  c.bond.bon_correction = True
  with pytest.raises(config_lib.ConfigError, match=r'bond\.bon_correction=True'):
    config_lib.validate(c)


def test_periodic_anchor_needs_a_period():
  c = load_config()
  c.bond.anchor = 'periodic'
  with pytest.raises(config_lib.ConfigError, match=r'bond\.anchor_period=0'):
    config_lib.validate(c)


# ---------------------------------------------------------------------------
# Hugging Face runs: model.preset and the checkpoint's config.json.

HF_CONFIGS = {'jbond_gemma2b': 'gemma_2b', 'jbond_gemma7b': 'gemma_7b', 'bond_xsum': 'gemma_2b'}
# config.json of google/gemma-7b, reduced to what sets the architecture.
GEMMA_7B_JSON = dict(
  model_type='gemma',
  hidden_act='gelu',
  vocab_size=256000,
  hidden_size=3072,
  intermediate_size=24576,
  num_hidden_layers=28,
  num_attention_heads=16,
  num_key_value_heads=16,
  head_dim=256,
  rms_norm_eps=1e-6,
)


@pytest.mark.parametrize('name', sorted(HF_CONFIGS))
def test_hf_configs_carry_no_noisy_copy_fields(name):
  c = load_config(name)
  assert c.task.to_dict() == {'name': 'hf'}
  assert 'reference' not in c


@pytest.mark.parametrize('name,preset', sorted(HF_CONFIGS.items()))
def test_hf_config_without_checkpoint_has_its_presets_shapes(name, preset):
  c = load_config(name)
  assert c.model.hf_checkpoint == '' and c.model.preset == preset
  assert config_lib.model_config(c) == dataclasses.replace(
    presets.PRESETS[preset],
    dtype='bfloat16',
    param_dtype='float32',
    remat=c.model.remat,
    scan_layers=c.model.scan_layers,
  )
  c.model.preset = ''  # nothing left to take the shapes from
  with pytest.raises(config_lib.ConfigError, match=r"model\.preset='' .*model\.hf_checkpoint"):
    config_lib.model_config(c)


def _hf_config(tmp_path, preset: str, **checkpoint_json):
  """jbond_gemma2b.py with `preset`, pointed at a checkpoint that has only a config.json
  (Gemma 7B's unless overridden): validation reads no weights."""
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  (ckpt / 'config.json').write_text(json.dumps({**GEMMA_7B_JSON, **checkpoint_json}))
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(json.dumps({'prompt': 'hello'}) + '\n')
  c = load_config('jbond_gemma2b')
  c.model.preset, c.model.hf_checkpoint = preset, str(ckpt)
  c.data.jsonl_path = str(prompts)
  c.reward.source, c.reward.fn = 'programmatic', 'terminated'
  c.mesh.data = c.mesh.model = 1
  return c


def test_hf_preset_must_match_the_checkpoint(tmp_path):
  c = _hf_config(tmp_path, 'gemma_2b')
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(
    f"config.model.preset='gemma_2b' does not match the checkpoint {c.model.hf_checkpoint}: "
    'num_layers is 18 in the preset but 28 in its config.json; '
    "set config.model.preset='gemma_7b'"
  ), message
  c.model.preset = 'gemma_7b'
  config_lib.validate(c)
  assert config_lib.model_config(c) == dataclasses.replace(
    presets.PRESETS['gemma_7b'],
    dtype='bfloat16',
    param_dtype='float32',
    remat='block',
    scan_layers=True,
  )


def test_hf_checkpoint_that_no_preset_describes(tmp_path):
  c = _hf_config(tmp_path, 'gemma_7b', num_key_value_heads=8)
  with pytest.raises(
    config_lib.ConfigError,
    match=r'num_kv_heads is 16 in the preset but 8 in its config\.json; '
    r"set config\.model\.preset=''",
  ):
    config_lib.validate(c)
  c.model.preset = ''  # the checkpoint's architecture only
  config_lib.validate(c)
  assert config_lib.model_config(c).num_kv_heads == 8
  c.model.preset = 'gemma_8b'
  with pytest.raises(config_lib.ConfigError, match=r"model\.preset='gemma_8b' .*or ''"):
    config_lib.validate(c)


def _run_script(*flags):
  return subprocess.run(
    [
      sys.executable,
      str(ROOT / 'scripts' / 'train.py'),
      '--config=' + str(ROOT / 'configs' / 'jbond_tiny.py'),
      *flags,
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )


def test_script_rejects_misspelt_override_and_bad_value(tmp_path):
  typo = _run_script('--config.bond.bta=0.3', f'--workdir={tmp_path}')
  assert typo.returncode != 0 and 'bta' in typo.stderr
  bad = _run_script('--config.bond.beta=1.5', f'--workdir={tmp_path}')
  assert bad.returncode != 0
  assert 'config.bond.beta=1.5 is invalid' in bad.stderr
  assert not (tmp_path / 'checkpoints').exists()  # rejected before any work was done


def test_more_examples_than_prompts_shows_every_prompt():
  """A config that asks for 5 examples but evaluates 2 prompts is valid and shows both."""
  c = load_config()
  c.eval.num_prompts, c.eval.show_examples = 2, 5
  config_lib.validate(c)
  assert evaluation.show_examples(c) == 2
