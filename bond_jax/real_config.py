"""Start-up checks for configs that train a Hugging Face policy (`task.name = 'hf'`).

`validate_real` complements `config_lib.validate` for the fields that only the
real-model configs have (model.hf_checkpoint, tokenizer, data, reward, mesh.model):
it runs before anything is loaded or compiled and raises a one-line `ConfigError`
naming the field, its value and the fix. Paths default to '' in the config files,
so a run that forgot one stops here rather than minutes into loading.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from bond_jax import data, rewards
from bond_jax.config_lib import ConfigError

DTYPES = ('float32', 'bfloat16')
SOURCES = ('tfds', 'jsonl')
REWARD_SOURCES = ('model', 'programmatic')


def _fail(field: str, value, fix: str) -> None:
  raise ConfigError(f'config.{field}={value!r} is invalid: {fix}.')


def _check_dir(field: str, path: str, what: str, needs: str | None = None) -> None:
  if not path:
    _fail(field, path, f'set it to a local {what} (nothing is downloaded)')
  if not Path(path).is_dir():
    _fail(field, path, f'no such directory (expected a local {what})')
  if needs and not (Path(path) / needs).is_file():
    _fail(field, path, f'no {needs} in it (expected a local {what})')


def _positive_int(field: str, value) -> None:
  if not (isinstance(value, int) and value > 0):
    _fail(field, value, 'must be an integer > 0')


def tokenizer_path(c: ml_collections.ConfigDict) -> str:
  """The policy tokenizer's directory: tokenizer.path, or model.hf_checkpoint when ''."""
  return c.tokenizer.path or c.model.hf_checkpoint


def validate_real(c: ml_collections.ConfigDict) -> None:
  """Reject missing paths and bad values of the real-model fields, naming the field."""
  if c.task.name != 'hf':
    _fail('task.name', c.task.name, "validate_real checks configs with task.name='hf'")
  _check_dir('model.hf_checkpoint', c.model.hf_checkpoint,
             'Hugging Face *ForCausalLM checkpoint directory', 'config.json')
  for field in ('model.dtype', 'model.param_dtype'):
    value = c.model.dtype if field == 'model.dtype' else c.model.param_dtype
    if value not in DTYPES:
      _fail(field, value, f'one of {DTYPES}')
  if c.tokenizer.path:
    _check_dir('tokenizer.path', c.tokenizer.path, 'tokenizer directory')

  d = c.data
  if d.source not in SOURCES:
    _fail('data.source', d.source, f'one of {SOURCES}')
  if d.source == 'tfds':
    for field in ('tfds_name', 'split', 'text_field'):
      if not d[field]:
        _fail(f'data.{field}', d[field], "must be set when data.source='tfds'")
    if d.tfds_data_dir and not Path(d.tfds_data_dir).is_dir():
      _fail('data.tfds_data_dir', d.tfds_data_dir, "no such directory ('' = TFDS default)")
  else:
    if not Path(d.jsonl_path).is_file():
      _fail('data.jsonl_path', d.jsonl_path, 'set it to a local JSONL file (one object per line)')
    if d.eval_jsonl_path and not Path(d.eval_jsonl_path).is_file():
      _fail('data.eval_jsonl_path', d.eval_jsonl_path, "no such file ('' = data.jsonl_path)")
    if not d.jsonl_field:
      _fail('data.jsonl_field', d.jsonl_field, 'name the key that holds the prompt text')
  if '{text}' not in d.prompt_template:
    _fail('data.prompt_template', d.prompt_template, "must contain '{text}'")
  _positive_int('data.max_prompt_len', d.max_prompt_len)
  if d.overlong not in data.OVERLONG:
    _fail('data.overlong', d.overlong, f'one of {data.OVERLONG}')
  if not isinstance(d.shuffle_seed, int):
    _fail('data.shuffle_seed', d.shuffle_seed, 'must be an integer')

  r = c.reward
  if r.source not in REWARD_SOURCES:
    _fail('reward.source', r.source, f'one of {REWARD_SOURCES}')
  if r.source == 'model':
    _check_dir('reward.checkpoint', r.checkpoint,
               'Hugging Face *ForSequenceClassification checkpoint directory', 'config.json')
    if r.tokenizer_path:
      _check_dir('reward.tokenizer_path', r.tokenizer_path, 'tokenizer directory')
      _positive_int('reward.max_len', r.max_len)
    if r.dtype not in DTYPES:
      _fail('reward.dtype', r.dtype, f'one of {DTYPES}')
  elif r.fn not in rewards.PROGRAMMATIC:
    _fail('reward.fn', r.fn, f'one of {sorted(rewards.PROGRAMMATIC)}')
  _positive_int('mesh.model', c.mesh.model)
