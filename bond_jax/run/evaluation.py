"""Evaluation of runs: the final table, the evaluation during training, and any checkpoint
of any workdir read back onto the mesh the evaluation runs on.

Every path goes through `eval.bon_table.bon_table` (and so `eval.estimates`): mean reward
with its standard error, KL(pi || pi_ref), the log quantile and the win rate against pi_ref
samples, the KLs to Best-of-`eval.kl_n` of pi_ref, the Best-of-N rows of pi_ref and the
largest N the policy matches. Samples come from the models' own distributions (temperature
1, untruncated) on the held-out prompts, with a fixed evaluation RNG stream.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections

from bond_jax.algo import step as step_lib
from bond_jax.algo.state import TrainState
from bond_jax.eval import bon_table
from bond_jax.models import sharding
from bond_jax.run import checkpoint, guards
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.run.guards import RunError
from bond_jax.run.setup import log
from bond_jax.types import ConfigError, PyTree

WHICH = ('policy', 'anchor')


def table(
  c: ml_collections.ConfigDict,
  setup: run_setup.RunSetup,
  params: PyTree,
  ref_params: PyTree,
  num_prompts: int | None = None,
  examples: int = 0,
) -> dict[str, Any]:
  """The evaluation table of `params` against pi_ref, on the first `num_prompts` held-out
  prompts (all of `eval.num_prompts` by default); with `examples`, the first few prompts
  and a sample of each model (as text for a Hugging Face run)."""
  prompt, valid = setup.eval_prompts
  if num_prompts is not None:
    prompt, valid = prompt[:num_prompts], valid[:num_prompts]
  result = bon_table.bon_table(
    setup.cfg,
    ref_params,
    params,
    prompt,
    valid,
    setup.step_cfg.reward_fn,
    setup.reward_params,
    jax.random.fold_in(run_setup.stream_key(c.seed, run_setup.EVAL_STREAM), 1),
    run_setup.eval_sampling(setup),
    samples_per_prompt=c.eval.samples_per_prompt,
    bon_ns=tuple(c.eval.bon_ns),
    policy_samples_per_prompt=c.eval.policy_samples_per_prompt,
    kl_n=c.eval.kl_n or None,
    examples=examples,
    micro_batch=config_lib.memory(c, 'eval.micro_batch_size'),
    chunk=config_lib.memory(c, 'train.logprob_chunk'),
  )
  tok = setup.tokenizer
  return result if tok is None else bon_table.with_text(result, tok.prompt_text, tok.decode)


# The table's scalars that the evaluation during training logs, as eval/<name>.
_TRAINING_METRICS = {
  'reward_policy': 'reward_policy',
  'reward_policy_stderr': 'reward_stderr',
  'kl_policy_ref': 'kl_ref',
  'log_quantile': 'log_quantile',
  'win_rate': 'win_rate',
  'kl_bwd': 'kl_bwd',
  'kl_fwd': 'kl_fwd',
  'matches_bon_n': 'matches_bon_n',
}


def during_training(
  c: ml_collections.ConfigDict, setup: run_setup.RunSetup, state: TrainState
) -> dict[str, float]:
  """The policy's metrics on the first `eval.every_num_prompts` held-out prompts (at most
  all of them), keyed eval/<name>."""
  result = table(c, setup, model_of(setup, state), state.ref_params, c.eval.every_num_prompts)
  return {
    f'eval/{name}': float(result[key]) for key, name in _TRAINING_METRICS.items() if key in result
  }


def model_of(setup: run_setup.RunSetup, state: TrainState, which: str = 'policy') -> PyTree:
  """The parameters of the state's policy or anchor as a model computes with them (with
  LoRA, the frozen base with those adapters attached)."""
  trained = state.params if which == 'policy' else state.anchor_params
  return step_lib.model_params(setup.step_cfg, state, trained)


def show_examples(c: ml_collections.ConfigDict) -> int:
  """How many held-out prompts to show: eval.show_examples (0 for a config that predates it),
  at most eval.num_prompts."""
  return min(c.eval.get('show_examples', 0), c.eval.num_prompts)


def summary(
  c: ml_collections.ConfigDict, setup: run_setup.RunSetup, state: TrainState, workdir: pathlib.Path
) -> dict[str, Any]:
  """The table of `state`'s policy on all held-out prompts, printed and written to
  workdir/summary.json (the end of a run, and scripts/evaluate.py's default)."""
  result = table(c, setup, model_of(setup, state), state.ref_params, examples=show_examples(c))
  result['step'] = int(state.step)
  if jax.process_index() == 0:  # every process computes the table (it is sharded); one writes
    (pathlib.Path(workdir) / 'summary.json').write_text(json.dumps(result, indent=2))
    print(bon_table.format_table(result), flush=True)
  return result


def _read_config(
  workdir: pathlib.Path, mesh_shape: tuple[int, int, int] | None, num_prompts: int | None
) -> ml_collections.ConfigDict:
  config_path = workdir / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} not found: is {workdir} a bond_jax workdir?')
  c = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  if mesh_shape is not None:
    if len(mesh_shape) != 3:
      raise ConfigError(
        f'mesh_shape={tuple(mesh_shape)!r} is invalid: give (data, fsdp, model) sizes.'
      )
    c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh_shape
  if num_prompts is not None:
    c.eval.num_prompts = num_prompts
  config_lib.validate(c)
  return c


def _open(workdir: pathlib.Path, c: ml_collections.ConfigDict):
  """(setup, restore target with this machine's shardings, read-only checkpoints)."""
  mesh = run_setup.make_mesh(c)
  setup = run_setup.build(c, mesh)
  abstract = run_setup.abstract_state(setup)
  target = checkpoint.with_sharding(abstract, sharding.param_shardings(abstract, mesh))
  # A Hugging Face run's checkpoints leave pi_ref out: reload it from model.hf_checkpoint,
  # checked against the checksum they recorded.
  ckpts = checkpoint.Checkpoints(
    workdir / 'checkpoints',
    c.ckpt.every,
    c.ckpt.keep,
    read_only=True,
    reload=guards.reference_reloader(c, setup),
  )
  return setup, target, ckpts


def load_workdir(
  workdir: str | pathlib.Path,
  *,
  step: int | None = None,
  mesh_shape: tuple[int, int, int] | None = None,
  num_prompts: int | None = None,
) -> tuple[ml_collections.ConfigDict, run_setup.RunSetup, TrainState]:
  """A run's config, setup and TrainState (the latest usable checkpoint, or `step`), read
  back from its workdir onto a (mesh.data, mesh.fsdp, mesh.model) = `mesh_shape` mesh of
  this machine (default: the run's; -1 takes all remaining devices). A damaged latest
  checkpoint is skipped with a warning."""
  workdir = pathlib.Path(workdir)
  c = _read_config(workdir, mesh_shape, num_prompts)
  setup, target, ckpts = _open(workdir, c)
  try:
    (state,) = _states(ckpts, target, step, all_steps=False)
  except checkpoint.CheckpointError as e:
    raise RunError(str(e)) from e
  finally:
    ckpts.close()
  return c, setup, state


def evaluate_workdir(
  workdir: str | pathlib.Path,
  *,
  step: int | None = None,
  all_steps: bool = False,
  which: str = 'policy',
  mesh_shape: tuple[int, int, int] | None = None,
  num_prompts: int | None = None,
) -> list[dict[str, Any]]:
  """Evaluate checkpoints of a workdir: the latest usable one, `step`, or (`all_steps`) every
  kept one; the policy or (`which='anchor'`) the anchor; on a (data, fsdp, model) =
  `mesh_shape` mesh of this machine (default: the run's; -1 takes all remaining devices),
  on the first `num_prompts` held-out prompts (default: the run's eval.num_prompts).

  Writes workdir/eval/step_<N>_<which>.json for each step (eval/all_steps_<which>.jsonl
  with `all_steps`; each result's 'mesh' is the [data, fsdp, model] sizes used), and
  summary.json when it evaluates the latest policy with the run's settings; prints each
  table and returns them.
  """
  workdir = pathlib.Path(workdir)
  if which not in WHICH:
    raise ConfigError(f'--which={which!r} is invalid: one of {WHICH}.')
  c = _read_config(workdir, mesh_shape, num_prompts)
  bond = config_lib.bond_config(c)
  if which == 'anchor' and not bond.keeps_anchor_copy:
    raise ConfigError(
      f'--which=anchor: this run keeps no anchor copy (bond.algorithm={bond.algorithm!r}, '
      f'bond.anchor={bond.anchor!r}; a fixed anchor is pi_ref itself); use --which=policy.'
    )
  setup, target, ckpts = _open(workdir, c)
  try:
    states = list(_states(ckpts, target, step, all_steps))
  except checkpoint.CheckpointError as e:
    raise RunError(str(e)) from e
  finally:
    ckpts.close()
  out_dir = workdir / 'eval'
  if jax.process_index() == 0:
    out_dir.mkdir(exist_ok=True)
  results = []
  for state in states:
    with guards.reward_failures():
      results.append(_evaluate(c, setup, workdir, state, which, step, all_steps, num_prompts))
  if all_steps and jax.process_index() == 0:
    lines = ''.join(json.dumps(r) + '\n' for r in results)
    (out_dir / f'all_steps_{which}.jsonl').write_text(lines)
  return results


def _evaluate(
  c: ml_collections.ConfigDict,
  setup: run_setup.RunSetup,
  workdir: pathlib.Path,
  state: TrainState,
  which: str,
  step: int | None,
  all_steps: bool,
  num_prompts: int | None,
) -> dict[str, Any]:
  """One checkpoint's table (`evaluate_workdir`), printed and written to workdir/eval/."""
  if which == 'policy' and step is None and not all_steps and num_prompts is None:
    result = summary(c, setup, state, workdir)
  else:
    result = table(c, setup, model_of(setup, state, which), state.ref_params)
    result['step'] = int(state.step)
    print(f'step {result["step"]}, {which}:', bon_table.format_table(result), sep='\n')
  result.update(which=which, mesh=list(config_lib.mesh_shape(c, jax.device_count())))
  if jax.process_index() == 0:
    (workdir / 'eval' / f'step_{result["step"]}_{which}.json').write_text(
      json.dumps(result, indent=2)
    )
  return result


def _states(ckpts: checkpoint.Checkpoints, target: PyTree, step: int | None, all_steps: bool):
  if all_steps:
    for kept in ckpts.steps:
      try:
        yield ckpts.load(kept, target)[0]
      except checkpoint.CheckpointError as e:
        log(f'warning: skipped checkpoint step {kept} ({e})')
    return
  if step is not None:
    if step not in ckpts.steps:
      raise FileNotFoundError(
        f'no checkpoint of step {step} in {ckpts.directory}; kept steps: {ckpts.steps}'
      )
    yield ckpts.load(step, target)[0]
    return
  restored = ckpts.restore_latest(target)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint under {ckpts.directory}')
  for skipped, why in restored.skipped:
    log(f'warning: skipped checkpoint step {skipped} ({why}); using step {restored.step}')
  yield restored.state
