"""Config checking and the static objects built from a config.

`validate` runs before anything is compiled and raises a one-line
`ConfigError` naming the field, the value and what is allowed. The config files
in `configs/` define every field a run reads (configs are locked, so a misspelt
override is an error), and none that its kind of run never reads: a Hugging Face
run (task.name = 'hf') has no task.prompt_len, task.keep_prob or reference block,
the embedded task no tokenizer, data or reward block. This module only reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import pathlib
import types
from pathlib import Path

import jax
import ml_collections

from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.step import StepConfig
from bond_jax.data import prompts, rewards, tasks
from bond_jax.models import decoder as model_lib
from bond_jax.models import hf_config, presets, sampling, sharding
from bond_jax.models import lora as lora_lib
from bond_jax.models.config import REMAT_POLICIES
from bond_jax.types import ConfigError, RewardFn

TASKS = ('noisy_copy', 'hf')
DTYPES = ('float32', 'bfloat16')
SOURCES = ('tfds', 'jsonl')
REWARD_SOURCES = rewards.SOURCES
# What a preset and a checkpoint must agree on: the shapes of every parameter.
SHAPE_FIELDS = (
  'vocab_size',
  'num_layers',
  'embed_dim',
  'hidden_dim',
  'num_heads',
  'num_kv_heads',
  'head_dim',
)


def load_config_module(path: str | pathlib.Path) -> types.ModuleType:
  """A config file as a module (its `get_config`, and `get_sweep` where it declares one)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f'config file {path} does not exist.')
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`) of a config file, as the train script would."""
  module = load_config_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def unknown_field(c: ml_collections.ConfigDict, dotted: str) -> str | None:
  """None when `dotted` (e.g. 'bond.eta') names a field of `c`; else one line naming the
  first missing part and the closest existing name."""
  node, done = c, []
  for part in dotted.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1)
      where = 'config.' + '.'.join(done) if done else 'the config'
      hint = f' (did you mean config.{".".join([*done, close[0]])}?)' if close else ''
      return f'{where} has no field {part!r}{hint}'
    node, done = node[part], [*done, part]
  return None


def _fail(field: str, value, fix: str) -> None:
  raise ConfigError(f'config.{field}={value!r} is invalid: {fix}.')


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    _fail(field, value, allowed)


def _positive_int(c: ml_collections.ConfigDict, field: str) -> None:
  value = c
  for part in field.split('.'):
    value = value[part]
  _check(isinstance(value, int) and value > 0, field, value, 'must be an integer > 0')


def validate(c: ml_collections.ConfigDict, check_devices: bool = True) -> None:
  """Reject every bad value at start-up, with a message that names the field.

  `check_devices=False` skips what depends on this machine (the device and process
  counts), for a sweep printed here and launched elsewhere.
  """
  bond = bond_config(c)  # the algorithm's knobs check themselves
  for field in (
    'train.num_steps',
    'train.batch_size',
    'sampling.max_new_tokens',
    'optim.warmup_steps',
    'ckpt.every',
    'ckpt.keep',
    'eval.num_prompts',
    'eval.samples_per_prompt',
    'eval.policy_samples_per_prompt',
    'eval.every_num_prompts',
  ):
    if field == 'optim.warmup_steps':
      _check(
        isinstance(c.optim.warmup_steps, int) and c.optim.warmup_steps >= 0,
        field,
        c.optim.warmup_steps,
        'must be an integer >= 0',
      )
      continue
    _positive_int(c, field)
  if bond.use_baseline:
    _check(
      c.train.batch_size >= 2,
      'train.batch_size',
      c.train.batch_size,
      'the leave-one-out baseline needs >= 2 prompts per batch',
    )
  mesh = mesh_shape(c, jax.device_count() if check_devices else None)
  data_parallel = mesh[0] * mesh[1] if mesh else c.mesh.data * c.mesh.fsdp
  if data_parallel > 0:  # negative: a -1 axis, resolved only on the machine that runs it
    _check(
      c.train.batch_size % data_parallel == 0,
      'train.batch_size',
      c.train.batch_size,
      f'must be divisible by mesh.data * mesh.fsdp = {data_parallel} '
      '(prompts are split across those devices)',
    )
  if check_devices:
    _check(
      c.train.batch_size % jax.process_count() == 0,
      'train.batch_size',
      c.train.batch_size,
      f'must split evenly over the {jax.process_count()} processes',
    )
  _check(c.optim.learning_rate > 0, 'optim.learning_rate', c.optim.learning_rate, 'must be > 0')
  _check(
    c.optim.grad_clip_norm >= 0,
    'optim.grad_clip_norm',
    c.optim.grad_clip_norm,
    'must be >= 0 (0 disables clipping)',
  )
  s = c.sampling
  _check(
    s.temperature > 0,
    'sampling.temperature',
    s.temperature,
    'training samples must come from a temperature > 0',
  )
  _check(isinstance(s.top_k, int) and s.top_k >= 0, 'sampling.top_k', s.top_k, 'must be >= 0')
  _check(0.0 < s.top_p <= 1.0, 'sampling.top_p', s.top_p, 'must be in (0, 1]')
  ns = tuple(c.eval.bon_ns)
  _check(
    all(isinstance(n, int) and 1 <= n <= c.eval.samples_per_prompt for n in ns),
    'eval.bon_ns',
    ns,
    'each N must be in [1, eval.samples_per_prompt]',
  )
  _check(
    isinstance(c.eval.kl_n, int) and 0 <= c.eval.kl_n <= c.eval.samples_per_prompt,
    'eval.kl_n',
    c.eval.kl_n,
    '0 (off) or an N in [1, eval.samples_per_prompt]',
  )
  _check(
    isinstance(c.eval.every, int) and c.eval.every >= 0,
    'eval.every',
    c.eval.every,
    'must be an integer >= 0 (0: evaluate only at the end)',
  )
  examples = c.eval.get('show_examples', 0)
  _check(
    isinstance(examples, int) and not isinstance(examples, bool) and examples >= 0,
    'eval.show_examples',
    examples,
    'an integer >= 0 (0: none; at most eval.num_prompts are shown)',
  )
  _validate_memory(c)
  lora_config(c)
  _check(c.task.name in TASKS, 'task.name', c.task.name, f'one of {TASKS}')
  if c.task.name == 'hf':
    validate_real(c)
    return
  # The embedded task.
  for field in ('task.prompt_len', 'reference.sft_steps', 'reference.sft_batch_size'):
    _positive_int(c, field)
  _check(0.0 < c.task.keep_prob <= 1.0, 'task.keep_prob', c.task.keep_prob, 'must be in (0, 1]')
  _check(
    c.model.preset in presets.PRESETS,
    'model.preset',
    c.model.preset,
    f'one of {sorted(presets.PRESETS)}',
  )


# Memory knobs and their defaults (off); a config written before they existed reads these.
MEMORY_DEFAULTS = {
  'model.remat': 'none',
  'model.scan_layers': False,  # layout of the parameters, so fixed for a run's life
  'model.reference_dtype': '',  # '': model.param_dtype
  'optim.mu_dtype': '',  # '': the parameters' dtype
  'sampling.micro_batch_size': 0,
  'sampling.decode_dtype': '',  # '': the weights' own dtype
  'data.prompt_bucket': 0,  # 0: pad every batch to data.max_prompt_len
  'train.micro_batch_size': 0,
  'train.logprob_chunk': 0,
  'train.share_prompts': False,
  'eval.micro_batch_size': 0,
  'reward.function': '',  # reward.source='python' only
  'model.lora.rank': 0,  # no adapters (`lora_config`); the parameter layout, fixed for a run
  'model.lora.alpha': 0.0,
  'model.lora.targets': [],
}


def memory(c: ml_collections.ConfigDict, field: str):
  """A memory knob's value (its default when the config predates it)."""
  section, key = field.split('.')
  return c[section].get(key, MEMORY_DEFAULTS[field])


def memory_dtype(c: ml_collections.ConfigDict, field: str) -> str | None:
  """A dtype knob's value, None for '' (the parameters' own dtype)."""
  return memory(c, field) or None


def _validate_memory(c: ml_collections.ConfigDict) -> None:
  remat = memory(c, 'model.remat')
  _check(
    remat in REMAT_POLICIES,
    'model.remat',
    remat,
    f'one of {tuple(REMAT_POLICIES)}',
  )
  for field in ('model.scan_layers', 'train.share_prompts'):
    value = memory(c, field)
    _check(isinstance(value, bool), field, value, 'True or False')
  for field in ('model.reference_dtype', 'optim.mu_dtype', 'sampling.decode_dtype'):
    value = memory(c, field)
    _check(value in ('', *DTYPES), field, value, f"'' (the parameters' dtype) or one of {DTYPES}")
  for field, whole, what in (
    ('sampling.micro_batch_size', 'train.batch_size', c.train.batch_size),
    ('train.micro_batch_size', 'train.batch_size', c.train.batch_size),
    ('train.logprob_chunk', 'sampling.max_new_tokens', c.sampling.max_new_tokens),
  ):
    size = memory(c, field)
    _check(
      isinstance(size, int) and not isinstance(size, bool) and size >= 0
      and (size == 0 or what % size == 0),
      field,
      size,
      f'must be 0 (off) or a divisor of {whole}={what}',
    )  # fmt: skip
  micro, group = memory(c, 'train.micro_batch_size'), bond_config(c).update_rows_per_prompt
  if memory(c, 'train.share_prompts') and group > 1 and micro:
    _check(
      micro % group == 0,
      'train.micro_batch_size',
      micro,
      f'with train.share_prompts=True a micro-batch holds whole prompts: a multiple of their '
      f'{group} rows each (bond.algorithm={c.bond.algorithm!r}), or set train.share_prompts=False',
    )
  size = memory(c, 'eval.micro_batch_size')  # prompts at a time, of each evaluation's
  evaluated = [('eval.num_prompts', c.eval.num_prompts)]
  if c.eval.every:
    evaluated.append(('eval.every_num_prompts', min(c.eval.every_num_prompts, c.eval.num_prompts)))
  for whole, what in evaluated:
    _check(
      isinstance(size, int) and not isinstance(size, bool) and size >= 0
      and (size == 0 or size >= what or what % size == 0),
      'eval.micro_batch_size',
      size,
      f'must be 0 (off) or a divisor of {whole}={what}',
    )  # fmt: skip


def mesh_shape(
  c: ml_collections.ConfigDict, num_devices: int | None
) -> tuple[int, int, int] | None:
  """(data, fsdp, model) of the `mesh` block on `num_devices` devices (a -1 axis takes the
  rest), checked; with `num_devices` None only the sizes' form is checked and None returned."""
  sizes = (c.mesh.data, c.mesh.fsdp, c.mesh.model)
  try:
    if num_devices is None:
      fixed = (
        math.prod(size for size in sizes if size != -1)
        if all(isinstance(size, int) for size in sizes)
        else 1
      )
      sharding.resolve_mesh_shape(*sizes, max(fixed, 1))
      return None
    return sharding.resolve_mesh_shape(*sizes, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def model_config(c: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The run's architecture, computing in model.dtype with model.param_dtype weights.

  The embedded task: model.preset. A Hugging Face run: the config.json of
  model.hf_checkpoint when it is set (what is loaded; `validate` checked that it has
  the preset's shapes), else model.preset's, so shapes (and memory) can be planned
  without the checkpoint.
  """
  dtypes = dict(
    dtype=c.model.dtype,
    param_dtype=c.model.param_dtype,
    remat=memory(c, 'model.remat'),
    scan_layers=memory(c, 'model.scan_layers'),
    lora=lora_config(c),
  )
  if c.task.name == 'hf' and c.model.hf_checkpoint:
    return dataclasses.replace(checkpoint_config(c.model.hf_checkpoint), **dtypes)
  if c.model.preset not in presets.PRESETS:
    _fail(
      'model.preset',
      c.model.preset,
      f'one of {sorted(presets.PRESETS)} (or set model.hf_checkpoint on a Hugging Face run)',
    )
  return presets.preset(c.model.preset, **dtypes)


def lora_config(c: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
  """The `model.lora` block (rank 0, or a config that predates it: no adapters), checked."""
  block = c.model.get('lora')
  if block is None:
    return lora_lib.LoraConfig()
  if isinstance(block.targets, str):
    _fail('model.lora.targets', block.targets, "a tuple of names, e.g. ('q', 'v')")
  try:
    return lora_lib.LoraConfig(rank=block.rank, alpha=block.alpha, targets=tuple(block.targets))
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None


def task(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig) -> tasks.NoisyCopy:
  return tasks.NoisyCopy(
    vocab_size=cfg.vocab_size, prompt_len=c.task.prompt_len, keep_prob=c.task.keep_prob
  )


def sampling_params(c: ml_collections.ConfigDict) -> sampling.SamplingParams:
  s = c.sampling
  return sampling.SamplingParams(
    max_new_tokens=s.max_new_tokens,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    eos_id=tasks.EOS,
    pad_id=tasks.PAD,
  )


def bond_config(c: ml_collections.ConfigDict) -> BondConfig:
  """The `bond` block as the step's BondConfig; a field the step does not know is an error."""
  known = {f.name for f in dataclasses.fields(BondConfig)}
  unknown = sorted(set(c.bond) - known)
  if unknown:
    raise ConfigError(
      f'config.bond.{unknown[0]} is not a field of the train step: remove it, or add it to '
      'bond_jax.algo.algorithms.BondConfig.'
    )
  return BondConfig(**c.bond)


def step_config(
  c: ml_collections.ConfigDict,
  cfg: model_lib.ModelConfig,
  reward_fn: RewardFn,
  sp: sampling.SamplingParams,
) -> StepConfig:
  return StepConfig(
    model=cfg,
    sampling=sp,
    reward_fn=reward_fn,
    bond=bond_config(c),
    sample_micro_batch=memory(c, 'sampling.micro_batch_size'),
    micro_batch=memory(c, 'train.micro_batch_size'),
    logprob_chunk=memory(c, 'train.logprob_chunk'),
    share_prompts=memory(c, 'train.share_prompts'),
    decode_dtype=memory_dtype(c, 'sampling.decode_dtype'),
  )


# ---------------------------------------------------------------------------
# Real-model runs (task.name = 'hf'): paths, tokenizer, data and reward fields.


def _check_dir(field: str, path: str, what: str, needs: str | None = None) -> None:
  if not path:
    _fail(field, path, f'set it to a local {what} (nothing is downloaded)')
  if not Path(path).is_dir():
    _fail(field, path, f'no such directory (expected a local {what})')
  if needs and not (Path(path) / needs).is_file():
    _fail(field, path, f'no {needs} in it (expected a local {what})')


def tokenizer_path(c: ml_collections.ConfigDict) -> str:
  """The policy tokenizer's directory: tokenizer.path, or model.hf_checkpoint when ''."""
  return c.tokenizer.path or c.model.hf_checkpoint


def checkpoint_config(path: str) -> model_lib.ModelConfig:
  """The architecture in a checkpoint's config.json (float32; no weights are read)."""
  try:
    return hf_config.config_from_hf(hf_config.read_hf_config(path))
  except ValueError as e:  # an architecture the decoder does not implement
    raise ConfigError(f'config.model.hf_checkpoint={path!r} is invalid: {e}') from e


def _check_preset_matches_checkpoint(preset: str, path: str) -> None:
  """model.preset and the checkpoint's config.json agree on every parameter shape."""
  if not preset:
    return
  want, have = presets.PRESETS[preset], checkpoint_config(path)
  shapes = lambda cfg: tuple(getattr(cfg, f) for f in SHAPE_FIELDS)
  for field in SHAPE_FIELDS:
    if getattr(want, field) != getattr(have, field):
      same = [name for name, p in presets.PRESETS.items() if shapes(p) == shapes(have)]
      fix = (
        f'set config.model.preset={same[0]!r}'
        if same
        else "set config.model.preset='' to take the architecture from the checkpoint only"
      )
      raise ConfigError(
        f'config.model.preset={preset!r} does not match the checkpoint {path}: {field} is '
        f'{getattr(want, field)} in the preset but {getattr(have, field)} in its config.json; '
        f'{fix}, or point model.hf_checkpoint at a {preset} checkpoint.'
      )


def validate_real(c: ml_collections.ConfigDict) -> None:
  """Reject missing paths and bad values of the real-model fields, naming the field."""
  if c.task.name != 'hf':
    _fail('task.name', c.task.name, "validate_real checks configs with task.name='hf'")
  _check_dir(
    'model.hf_checkpoint',
    c.model.hf_checkpoint,
    'Hugging Face *ForCausalLM checkpoint directory',
    'config.json',
  )
  for field in ('model.dtype', 'model.param_dtype'):
    value = c.model.dtype if field == 'model.dtype' else c.model.param_dtype
    if value not in DTYPES:
      _fail(field, value, f'one of {DTYPES}')
  _check(
    c.model.preset == '' or c.model.preset in presets.PRESETS,
    'model.preset',
    c.model.preset,
    f"one of {sorted(presets.PRESETS)}, or '' to take the architecture from the checkpoint only",
  )
  _check_preset_matches_checkpoint(c.model.preset, c.model.hf_checkpoint)
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
  _positive_int(c, 'data.max_prompt_len')
  bucket = c.data.get('prompt_bucket', 0)
  _check(
    isinstance(bucket, int) and not isinstance(bucket, bool) and bucket >= 0,
    'data.prompt_bucket',
    bucket,
    'must be 0 (pad every batch to data.max_prompt_len) or a positive number of tokens',
  )
  if d.overlong not in prompts.OVERLONG:
    _fail('data.overlong', d.overlong, f'one of {prompts.OVERLONG}')
  if not isinstance(d.shuffle_seed, int):
    _fail('data.shuffle_seed', d.shuffle_seed, 'must be an integer')

  r = c.reward
  if r.source not in REWARD_SOURCES:
    _fail('reward.source', r.source, f'one of {REWARD_SOURCES}')
  if r.source == 'model':
    _check_dir(
      'reward.checkpoint',
      r.checkpoint,
      'Hugging Face *ForSequenceClassification checkpoint directory',
      'config.json',
    )
    if r.tokenizer_path:
      _check_dir('reward.tokenizer_path', r.tokenizer_path, 'tokenizer directory')
      _positive_int(c, 'reward.max_len')
    if r.dtype not in DTYPES:
      _fail('reward.dtype', r.dtype, f'one of {DTYPES}')
  elif r.source == 'programmatic' and r.fn not in rewards.PROGRAMMATIC:
    _fail('reward.fn', r.fn, f'one of {sorted(rewards.PROGRAMMATIC)}')
  elif r.source == 'python':
    rewards.load_function(r.get('function', ''))  # importable, and a function
