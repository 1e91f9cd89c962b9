"""Config validation: every bad value is rejected before anything compiles, by name."""

import pathlib
import subprocess
import sys

import pytest

from bond_jax.run import config as config_lib

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
    ('eval.bon_ns', (2, 64), r'eval\.bon_ns=\(2, 64\) .*samples_per_prompt'),
    ('reference.sft_steps', 0, r'reference\.sft_steps=0 .*> 0'),
  ],
)
def test_bad_value_is_rejected_with_its_name(field, value, message):
  c = load_config()
  section, key = field.split('.')
  c[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_batch_must_split_over_the_data_axis():
  c = load_config()
  c.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match=r'train\.batch_size=128 .*mesh\.data=3'):
    config_lib.validate(c)


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
