"""Start-up checks of a run, and the errors a run stops with.

Each check raises one line (a `ConfigError` or `RunError`) before anything is compiled:
an invalid train.max_bad_steps, an unwritable workdir, a config that cannot resume the
workdir's checkpoints (the fields are listed; the allowed changes are recorded in
config_changes.jsonl), a reward function of the wrong shape or dtype.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bond_jax.run import setup as run_setup
from bond_jax.run.setup import log
from bond_jax.types import ConfigError

# Config fields a resumed run may change: how long it runs, what it logs and evaluates,
# how often it checkpoints, how it is laid out on devices, and pi_ref's supervised
# training (pi_ref itself is restored from the checkpoint). A prefix ends with '.'.
RESUMABLE_CHANGES = (
  'train.num_steps',
  'train.max_bad_steps',
  'ckpt.every',
  'ckpt.keep',
  'eval.',
  'log.',
  'mesh.',
  'reference.',
)


class RunError(RuntimeError):
  """The run cannot go on; the message is one line for the user."""


class Preempted(RunError):
  """A stop signal arrived; the step it arrived in was checkpointed."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0]}' if text else type(e).__name__


def check_max_bad_steps(c: ml_collections.ConfigDict) -> None:
  value = c.train.max_bad_steps
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(
      f'config.train.max_bad_steps={value!r} is invalid: must be an integer >= 1 (skipped '
      'non-finite steps in a row that stop the run).'
    )


def prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """The workdir, created if needed; RunError when it cannot be written."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test.{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise RunError(f'workdir {workdir} is not writable ({_first_line(e)}).') from e
  return workdir


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def config_changes(
  previous: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """(allowed, refused) differences between two configs as JSON, {field: (old, new)};
  a field one of them lacks shows as '<absent>'."""
  old, new = _flatten(previous), _flatten(current)
  allowed, refused = {}, {}
  for field in sorted(old.keys() | new.keys()):
    a, b = old.get(field, '<absent>'), new.get(field, '<absent>')
    if a == b:
      continue
    ok = any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_CHANGES)
    (allowed if ok else refused)[field] = (a, b)
  return allowed, refused


def check_resume_config(
  workdir: pathlib.Path, c: ml_collections.ConfigDict, resume_step: int | None
) -> None:
  """Refuse to resume a workdir's checkpoints under a config that changes what they mean;
  record the allowed changes in config_changes.jsonl; then write config.json."""
  path = workdir / 'config.json'
  current = json.loads(c.to_json_best_effort())
  if resume_step is not None and path.is_file():
    allowed, refused = config_changes(json.loads(path.read_text()), current)
    if refused:
      listed = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in refused.items())
      raise ConfigError(
        f'{workdir} holds checkpoints of a run with another config, which this one cannot '
        f'resume: {listed}; use a new --workdir, or change only '
        f'{", ".join(f + "*" if f.endswith(".") else f for f in RESUMABLE_CHANGES)}.'
      )
    if allowed:
      record = {
        'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'resumed_from_checkpoint': resume_step,
        'changes': {k: {'old': a, 'new': b} for k, (a, b) in allowed.items()},
      }
      with open(workdir / 'config_changes.jsonl', 'a') as f:
        f.write(json.dumps(record) + '\n')
      log(
        'config changed since the last run (recorded in config_changes.jsonl): '
        + ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in allowed.items())
      )
  path.write_text(c.to_json_best_effort(indent=2))


def _reward_source(c: ml_collections.ConfigDict) -> str:
  if c.task.name != 'hf':
    return f"the {c.task.name} task's reward"
  if c.reward.source == 'model':
    return f"reward.source='model', reward.checkpoint={c.reward.checkpoint!r}"
  return f"reward.source='programmatic', reward.fn={c.reward.fn!r}"


def check_reward(c: ml_collections.ConfigDict, setup: run_setup.RunSetup) -> None:
  """The reward function returns one float32 per response (checked on shapes only)."""
  rows, prompt_len = c.train.batch_size, setup.eval_prompts[0].shape[1]
  gen_len = setup.step_cfg.sampling.max_new_tokens
  arg = jax.ShapeDtypeStruct
  batch = (
    arg((rows, prompt_len), jnp.int32),
    arg((rows, prompt_len), jnp.bool_),
    arg((rows, gen_len), jnp.int32),
    arg((rows, gen_len), jnp.bool_),
  )
  source = _reward_source(c)
  try:
    out = jax.eval_shape(setup.step_cfg.reward_fn, setup.reward_params, *batch)
  except Exception as e:  # noqa: BLE001 (whatever it is, name the reward and stop)
    raise ConfigError(
      f'the reward ({source}) fails on a batch of {rows} responses of {gen_len} tokens '
      f'({_first_line(e)}).'
    ) from e
  one_float_per_row = isinstance(out, jax.ShapeDtypeStruct) and out.shape == (rows,)
  if not (one_float_per_row and out.dtype == jnp.float32):
    got = ', '.join(f'{x.dtype}{list(x.shape)}' for x in jax.tree.leaves(out)) or repr(out)
    raise ConfigError(
      f'the reward ({source}) returns {got} for a batch of {rows} responses; it must return '
      f'one float32 per response: float32[{rows}].'
    )
