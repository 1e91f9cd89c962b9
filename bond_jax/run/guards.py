"""Start-up checks of a run, and the errors a run stops with.

Each check raises one line (a `ConfigError` or `RunError`) before anything is compiled:
an invalid train.max_bad_steps, an unwritable workdir, a config that cannot resume the
workdir's checkpoints (the fields are listed; the allowed changes are recorded in
config_changes.jsonl), a reward function of the wrong shape or dtype, and, when a Hugging
Face run resumes, a pi_ref whose files changed since the checkpoint was saved.

pi_ref of a Hugging Face run is not saved in its checkpoints: it is `model.hf_checkpoint`,
reloaded on resume (`reference_reloader`). What each checkpoint records instead is
`reference_record`: the path and the SHA-256 of the files pi_ref is loaded from (its
safetensors, their index and config.json). The files' bytes, not the loaded arrays: they
hash the same on any mesh and any number of processes (a resume may change the mesh),
each process can hash them without gathering a tensor, and the hash does not depend on
how loading converts dtypes; the cost is one read of the files (hashed in parallel, much
less than loading them onto devices). A re-saved but equal checkpoint counts as changed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as orbax_multihost

from bond_jax.data import rewards
from bond_jax.run import checkpoint
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.run.setup import log
from bond_jax.types import ConfigError, PyTree

# Config fields a resumed run may change: how long it runs, what it logs and evaluates,
# how often it checkpoints, how it is laid out on devices and in memory (rematerialisation,
# micro-batches, chunked log-probs: the same update to float32 tolerance), and pi_ref's
# supervised training (pi_ref itself is restored from the checkpoint). A prefix ends
# with '.'.
RESUMABLE_CHANGES = (
  'train.num_steps',
  'train.max_bad_steps',
  'ckpt.every',
  'ckpt.keep',
  'eval.',
  'log.',
  'mesh.',
  'reference.',
  'model.remat',
  'train.micro_batch_size',
  'train.logprob_chunk',
  'train.share_prompts',
  'sampling.micro_batch_size',
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
  a field one of them lacks reads as its default when it has one (a config written before
  the field existed: `config.MEMORY_DEFAULTS`), else as '<absent>'."""
  old, new = _flatten(previous), _flatten(current)
  defaults = config_lib.MEMORY_DEFAULTS
  allowed, refused = {}, {}
  for field in sorted(old.keys() | new.keys()):
    a = old.get(field, defaults.get(field, '<absent>'))
    b = new.get(field, defaults.get(field, '<absent>'))
    if a == b:
      continue
    ok = any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_CHANGES)
    (allowed if ok else refused)[field] = (a, b)
  return allowed, refused


def _cluster_in_environment() -> str | None:
  """What in the environment says this is one of several processes, or None."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(v in os.environ for v in slurm) and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return 'SLURM_NTASKS'
  if 'OMPI_MCA_orte_hnp_uri' in os.environ and int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'OMPI_COMM_WORLD_SIZE'
  return None


def start_processes(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  detect: bool = False,
) -> bool:
  """Join the other processes of a multi-process run (`jax.distributed.initialize`) when
  the three flags --coordinator_address, --num_processes, --process_id are given, when
  `detect` (--distributed: JAX detects them on a TPU pod slice, SLURM or Open MPI), or
  when the environment says so (JAX_COORDINATOR_ADDRESS; SLURM or Open MPI with several
  tasks). Call before anything starts JAX's backend. True when it joined; ConfigError for
  inconsistent flags, RunError when joining fails."""
  explicit = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
  }
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and len(given) < 3 and not detect:
    missing = ', '.join(f'--{k}' for k in explicit if k not in given)
    raise ConfigError(
      f'{", ".join(f"--{k}" for k in given)} without {missing}: give all three, or add '
      '--distributed to let JAX detect the rest (TPU pod slice, SLURM, Open MPI).'
    )
  n, i = num_processes, process_id
  if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
    raise ConfigError(
      f'--process_id={i} --num_processes={n}: need 0 <= process_id < num_processes.'
    )
  why = '--distributed' if detect else ('flags' if given else _cluster_in_environment())
  if why is None:
    return False
  try:
    jax.distributed.initialize(**given)
  except Exception as e:  # noqa: BLE001 (a wrong address, a missing peer: one line)
    raise RunError(f'jax.distributed.initialize ({why}) failed: {_first_line(e)}') from e
  return True


def align_processes(name: str) -> None:
  """On several processes, wait until every one reaches this point (the coordination
  service's barrier, which waits long; `name` is used once), then open their collectives
  together. CPU (gloo) collectives give up when a peer is 30 s late to the first one over
  a set of devices; later ones wait."""
  if jax.process_count() > 1:
    orbax_multihost.get_barrier_sync_fn()(key=name, timeout_ms=60 * 60 * 1000)
    multihost_utils.sync_global_devices(name)


def check_resume_config(
  workdir: pathlib.Path, c: ml_collections.ConfigDict, resume_step: int | None
) -> None:
  """Refuse to resume a workdir's checkpoints under a config that changes what they mean;
  record the allowed changes in config_changes.jsonl; then write config.json (process 0,
  once every process has read the previous one)."""
  path = workdir / 'config.json'
  current = json.loads(c.to_json_best_effort())
  allowed = {}
  if resume_step is not None and path.is_file():
    allowed, refused = config_changes(json.loads(path.read_text()), current)
    if refused:
      listed = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in refused.items())
      raise ConfigError(
        f'{workdir} holds checkpoints of a run with another config, which this one cannot '
        f'resume: {listed}; use a new --workdir, or change only '
        f'{", ".join(f + "*" if f.endswith(".") else f for f in RESUMABLE_CHANGES)}.'
      )
  align_processes('bond_jax_config_read')
  if jax.process_index() != 0:
    return
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


# ---------------------------------------------------------------------------
# pi_ref of a Hugging Face run: reloaded, not saved.

REFERENCE = 'reference'  # checkpoint metadata: reference_record of the run
REFERENCE_FILES = ('config.json', '*.safetensors', '*.safetensors.index.json')


def reference_record(c: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """{'path', 'sha256', 'files': {name: sha256}} of the files pi_ref is loaded from on a
  Hugging Face run (model.hf_checkpoint); None on the embedded task, whose pi_ref is
  trained in-process and saved in each checkpoint."""
  if c.task.name != 'hf':
    return None
  path = c.model.hf_checkpoint
  try:
    files = checkpoint.file_digests(path, REFERENCE_FILES)
  except OSError as e:
    raise ConfigError(
      f'config.model.hf_checkpoint={path!r}: cannot read its files to checksum pi_ref '
      f'({_first_line(e)}).'
    ) from e
  return {'path': str(path), 'sha256': checkpoint.combined_digest(files), 'files': files}


def _files_changed(saved: dict[str, str], now: dict[str, str]) -> str:
  """'model.safetensors differs, x added' (at most three named)."""
  names = sorted(n for n in saved.keys() | now.keys() if saved.get(n) != now.get(n))
  what = [
    f'{n} {"added" if n not in saved else "removed" if n not in now else "differs"}'
    for n in names[:3]
  ]
  return ', '.join(what) + (f' and {len(names) - 3} more' if len(names) > 3 else '')


def reference_reloader(
  c: ml_collections.ConfigDict, setup: run_setup.RunSetup
) -> checkpoint.Reload:
  """What `checkpoint.Checkpoints` calls for a checkpoint that left pi_ref (ref_params) out:
  reload it from model.hf_checkpoint onto the target's shardings, once its files are
  checked against the checksum the checkpoint recorded; ConfigError when they changed.
  Loaded once and shared by every checkpoint it is asked for (all hold the same pi_ref)."""
  loaded: dict[str, PyTree] = {}
  now: list[dict[str, Any]] = []

  def reload(field: str, metadata: dict[str, Any], abstract: PyTree) -> PyTree:
    saved = metadata.get(REFERENCE)
    if field != 'ref_params' or not saved:
      raise ValueError(f'cannot reload {field!r} (recorded: {sorted(metadata)})')
    if not now:
      now.append(reference_record(c))
    if now[0]['sha256'] != saved['sha256']:
      raise ConfigError(
        f'config.model.hf_checkpoint={c.model.hf_checkpoint!r} changed since the checkpoint '
        f'was saved ({_files_changed(saved.get("files", {}), now[0]["files"])}; sha256 '
        f'{now[0]["sha256"][:12]}..., recorded {saved["sha256"][:12]}...): pi_ref is reloaded '
        'from it on resume; restore the files the run started from, or use a new --workdir.'
      )
    if saved['sha256'] not in loaded:
      shardings = jax.tree.map(lambda x: x.sharding, abstract)
      # In the dtype the state keeps it in (model.reference_dtype), as when the run began.
      cast = lambda x, want: x.astype(want.dtype)
      loaded[saved['sha256']] = jax.tree.map(cast, setup.reference(shardings), abstract)
    return loaded[saved['sha256']]

  return reload


def _reward_source(c: ml_collections.ConfigDict) -> str:
  if c.task.name != 'hf':
    return f"the {c.task.name} task's reward"
  if c.reward.source == 'model':
    return f"reward.source='model', reward.checkpoint={c.reward.checkpoint!r}"
  if c.reward.source == 'python':
    return f"reward.source='python', reward.function={c.reward.function!r}"
  return f"reward.source='programmatic', reward.fn={c.reward.fn!r}"


@contextlib.contextmanager
def reward_failures(after: str = '') -> Iterator[None]:
  """Turn the error JAX raises around a failed python reward (`rewards.RewardFunctionError`
  inside a callback, its traceback in the text) into a one-line RunError (+ `after`)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    failed = rewards.failure_line(e)
    if failed is None:
      raise
    raise RunError(failed + after) from None


def check_reward(c: ml_collections.ConfigDict, setup: run_setup.RunSetup) -> None:
  """The reward function returns one float32 per response (checked on shapes; a python
  reward's function is also called once on a few held-out prompts)."""
  rewards.probe(setup.step_cfg.reward_fn, *(x[:4] for x in setup.eval_prompts))
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
