"""The training loop: config -> setup -> BOND updates -> checkpoints -> BOND table.

`run` is what `scripts/train.py` calls. It is resumable: with an existing workdir it
restores the latest checkpoint (policy, anchor, reference, optimizer, step and RNG, plus
the prompt stream's position, saved as that checkpoint's metadata) and continues with
the next step and the next unseen batch, so a resumed run reproduces an uninterrupted
one.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

import jax
import ml_collections

from bond_jax.algo import state as state_lib
from bond_jax.algo import step as step_lib
from bond_jax.eval import bon_table as evaluate
from bond_jax.models import decoder as model_lib
from bond_jax.models import hf, sharding
from bond_jax.run import checkpoint, metrics
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.run.setup import log


def make_mesh(c: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return sharding.make_mesh(
    c.mesh.data, c.mesh.model, devices=jax.devices()[: c.mesh.data * c.mesh.model]
  )


def abstract_state(setup: run_setup.RunSetup) -> state_lib.TrainState:
  """Shapes and dtypes of the TrainState (nothing allocated): what checkpoints restore into."""

  def shape():
    params = model_lib.init_params(setup.cfg, jax.random.PRNGKey(0))
    return state_lib.init_state(
      setup.step_cfg.bond, params, params, setup.tx, jax.random.PRNGKey(0)
    )

  return jax.eval_shape(shape)


def _global(
  batch_sharding: jax.sharding.NamedSharding, global_rows: int, *local: Any
) -> list[jax.Array]:
  """Global batch arrays from each process's rows."""
  return [
    jax.make_array_from_process_local_data(batch_sharding, x, (global_rows, *x.shape[1:]))
    for x in local
  ]


def run(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Train (or resume) and evaluate. Returns the summary written to summary.json."""
  config_lib.validate(c)  # before anything is loaded or compiled
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(c.to_json_best_effort(indent=2))
  mesh = make_mesh(c)
  setup = run_setup.build(c, mesh)
  if not setup.step_cfg.sampling.is_exact:
    log(
      f'note: training samples use temperature={c.sampling.temperature}, '
      f'top_k={c.sampling.top_k}, top_p={c.sampling.top_p}; they are not draws from pi, '
      'so the KL metrics are estimates under that sampler.'
    )

  abstract = abstract_state(setup)
  state_sharding = sharding.param_shardings(abstract, mesh)
  batch_sharding = sharding.data_sharding(mesh)
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', c.ckpt.every, c.ckpt.keep)
  restored = ckpts.restore_latest(checkpoint.with_sharding(abstract, state_sharding))
  if restored is None:
    ref_params = setup.reference(state_sharding.ref_params)
    state = jax.jit(
      functools.partial(state_lib.init_state, setup.step_cfg.bond, tx=setup.tx),
      out_shardings=state_sharding,
    )(ref_params, ref_params, rng=run_setup.stream_key(c.seed, run_setup.STATE_STREAM))
  else:
    state, data_position = restored
    setup.prompts.restore(data_position)
    log(f'resumed from {workdir / "checkpoints"} at step {int(state.step)}')
  sharding.assert_big_tensors_sharded(state.params, mesh)

  step_fn = jax.jit(
    functools.partial(
      step_lib.train_step, cfg=setup.step_cfg, tx=setup.tx, schedule=setup.schedule
    ),
    in_shardings=(state_sharding, batch_sharding, batch_sharding, None),
    out_shardings=(state_sharding, None),
    donate_argnames='state',
  )
  start = int(state.step)
  writer = metrics.MetricWriter(
    workdir, c.train.num_steps, start, c.log.tensorboard, c.log.progress
  )
  t_last = time.time()
  try:
    for step in range(start, c.train.num_steps):
      prompt, valid = _global(batch_sharding, c.train.batch_size, *setup.prompts.next_batch())
      state, m = step_fn(state, prompt, valid, setup.reward_params)
      m = jax.device_get(m)
      now = time.time()
      m['tokens_per_s'] = float(m['generated_tokens']) / max(now - t_last, 1e-9)
      m['step_time_s'] = now - t_last
      t_last = now
      writer.write(step + 1, m)
      ckpts.save(step + 1, state, data_position=setup.prompts.state())
  finally:
    writer.close()
  ckpts.save(int(state.step), state, force=True, data_position=setup.prompts.state())
  ckpts.close()
  return evaluate_state(c, setup, state, workdir)


def evaluate_state(
  c: ml_collections.ConfigDict,
  setup: run_setup.RunSetup,
  state: state_lib.TrainState,
  workdir: pathlib.Path,
) -> dict[str, Any]:
  """The BOND table for `state`, printed and written to workdir/summary.json."""
  prompt, valid = setup.eval_prompts
  table = evaluate.bon_table(
    setup.cfg,
    state.ref_params,
    state.params,
    prompt,
    valid,
    setup.step_cfg.reward_fn,
    setup.reward_params,
    jax.random.fold_in(run_setup.stream_key(c.seed, run_setup.EVAL_STREAM), 1),
    run_setup.eval_sampling(setup),
    samples_per_prompt=c.eval.samples_per_prompt,
    bon_ns=tuple(c.eval.bon_ns),
    policy_samples_per_prompt=c.eval.policy_samples_per_prompt,
  )
  table['step'] = int(state.step)
  (workdir / 'summary.json').write_text(json.dumps(table, indent=2))
  print(evaluate.format_table(table), flush=True)
  return table


def load_workdir(
  workdir: str | pathlib.Path,
) -> tuple[ml_collections.ConfigDict, run_setup.RunSetup, state_lib.TrainState]:
  """A run's config, setup and latest TrainState, read back from its workdir."""
  workdir = pathlib.Path(workdir)
  config_path = workdir / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} not found: is {workdir} a bond_jax workdir?')
  c = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  config_lib.validate(c)
  mesh = make_mesh(c)
  setup = run_setup.build(c, mesh)
  abstract = abstract_state(setup)
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', c.ckpt.every, c.ckpt.keep)
  restored = ckpts.restore_latest(
    checkpoint.with_sharding(abstract, sharding.param_shardings(abstract, mesh))
  )
  ckpts.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint under {workdir / "checkpoints"}')
  return c, setup, restored[0]


def evaluate_workdir(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Read a run's config and latest checkpoint back, and evaluate it."""
  c, setup, state = load_workdir(workdir)
  return evaluate_state(c, setup, state, pathlib.Path(workdir))


def export_policy(workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
  """The latest checkpoint's policy as a Hugging Face checkpoint directory."""
  c, setup, state = load_workdir(workdir)
  tokenizer_dir = None
  if c.task.name == 'hf':
    tokenizer_dir = config_lib.tokenizer_path(c)
  return pathlib.Path(
    hf.export_hf(setup.cfg, jax.device_get(state.params), out_dir, tokenizer_dir=tokenizer_dir)
  )
