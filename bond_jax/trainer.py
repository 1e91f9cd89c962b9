"""The training loop: config -> reference policy -> BOND updates -> checkpoints -> BOND table.

`run` is what `scripts/train.py` calls. It is resumable: with an existing
workdir it restores the latest checkpoint (policy, anchor, reference,
optimizer, step and RNG) and continues from the next step; the prompt stream is
a pure function of (seed, step), so a resumed run sees the same prompts as an
uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from bond_jax import checkpoint, config_lib, evaluate, metrics, sft, sharding, train
from bond_jax import model as model_lib

# Independent streams derived from config.seed.
_SFT, _STATE, _DATA, _EVAL = range(4)


def _key(seed: int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def _log(msg: str) -> None:
  print(f'[bond_jax] {msg}', flush=True)


def build(c: ml_collections.ConfigDict):
  """Everything static the run needs, from a validated config."""
  cfg = config_lib.model_config(c)
  task = config_lib.task(c, cfg)
  step_cfg = config_lib.step_config(c, cfg, task.reward)
  tx, schedule = train.make_optimizer(c.optim.learning_rate, c.optim.warmup_steps, c.optim.b1,
                                      c.optim.b2, c.optim.grad_clip_norm)
  return cfg, task, step_cfg, tx, schedule


def initial_state(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig, task, tx
                  ) -> train.TrainState:
  """Train pi_ref by supervised learning, then policy = anchor = pi_ref."""
  t0 = time.time()
  ref_params, loss = sft.train(
      cfg, task.demonstrations, _key(c.seed, _SFT), steps=c.reference.sft_steps,
      batch_size=c.reference.sft_batch_size, learning_rate=c.reference.sft_learning_rate,
      log=lambda i, loss: _log(f'pi_ref supervised step {i}/{c.reference.sft_steps}: '
                               f'nll {loss:.3f}'))
  _log(f'pi_ref trained in {time.time() - t0:.0f}s (final nll per token {loss:.3f})')
  return train.init_state(ref_params, ref_params, tx, _key(c.seed, _STATE))


def _to_global(batch_sharding: jax.sharding.NamedSharding, *arrays: jax.Array
               ) -> list[jax.Array]:
  """Global batch arrays from this process's rows (every process computes the same global
  batch here, and contributes its contiguous slice of it)."""
  out = []
  for x in arrays:
    n, i = jax.process_count(), jax.process_index()
    local = np.asarray(x)[i * x.shape[0] // n:(i + 1) * x.shape[0] // n]
    out.append(jax.make_array_from_process_local_data(batch_sharding, local, x.shape))
  return out


def initial_state_shape(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig, tx
                        ) -> train.TrainState:
  """A state of the right structure (for `jax.eval_shape`): what checkpoints restore into."""
  del c
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  return train.init_state(params, params, tx, jax.random.PRNGKey(0))


def run(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Train (or resume) and evaluate. Returns the summary written to summary.json."""
  config_lib.validate(c)  # before anything compiles
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(c.to_json_best_effort(indent=2))
  cfg, task, step_cfg, tx, schedule = build(c)
  if not step_cfg.sampling.is_exact:
    _log(f'note: training samples use temperature={c.sampling.temperature}, '
         f'top_k={c.sampling.top_k}, top_p={c.sampling.top_p}; they are not draws from pi, '
         'so the KL metrics are estimates under that sampler.')

  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model,
                            devices=jax.devices()[:c.mesh.data * c.mesh.model])
  abstract_state = jax.eval_shape(lambda: initial_state_shape(c, cfg, tx))
  state_sharding = sharding.param_shardings(abstract_state, mesh)
  batch_sharding = sharding.data_sharding(mesh)

  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', c.ckpt.every, c.ckpt.keep)
  state = ckpts.restore_latest(checkpoint.with_sharding(abstract_state, state_sharding))
  if state is None:
    state = jax.device_put(initial_state(c, cfg, task, tx), state_sharding)
  else:
    _log(f'resumed from {workdir / "checkpoints"} at step {int(state.step)}')
  sharding.assert_big_tensors_sharded(state.params, mesh)

  step_fn = jax.jit(
      functools.partial(train.train_step, cfg=step_cfg, tx=tx, schedule=schedule),
      in_shardings=(state_sharding, batch_sharding, batch_sharding),
      out_shardings=(state_sharding, None), donate_argnames='state')
  start = int(state.step)
  writer = metrics.MetricWriter(workdir, c.train.num_steps, start, c.log.tensorboard,
                                c.log.progress)
  t_last = time.time()
  try:
    for step in range(start, c.train.num_steps):
      prompt, valid = task.prompts(jax.random.fold_in(_key(c.seed, _DATA), step),
                                   c.train.batch_size)
      state, m = step_fn(state, *_to_global(batch_sharding, prompt, valid))
      m = jax.device_get(m)
      now = time.time()
      m['tokens_per_s'] = float(m['generated_tokens']) / max(now - t_last, 1e-9)
      m['step_time_s'] = now - t_last
      t_last = now
      writer.write(step + 1, m)
      ckpts.save(step + 1, state)
  finally:
    writer.close()
  ckpts.save(int(state.step), state, force=True)
  ckpts.close()

  return evaluate_state(c, cfg, task, step_cfg, state, workdir)


def evaluate_state(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig, task,
                   step_cfg: train.StepConfig, state: train.TrainState,
                   workdir: pathlib.Path) -> dict[str, Any]:
  """The BOND table for `state`, printed and written to workdir/summary.json."""
  prompt, valid = task.prompts(_key(c.seed, _EVAL), c.eval.num_prompts)
  table = evaluate.bon_table(
      cfg, state.ref_params, state.params, prompt, valid, task.reward,
      jax.random.fold_in(_key(c.seed, _EVAL), 1), max_new_tokens=c.sampling.max_new_tokens,
      eos_id=step_cfg.sampling.eos_id, pad_id=step_cfg.sampling.pad_id,
      samples_per_prompt=c.eval.samples_per_prompt, bon_ns=tuple(c.eval.bon_ns),
      policy_samples_per_prompt=c.eval.policy_samples_per_prompt)
  table['step'] = int(state.step)
  (workdir / 'summary.json').write_text(json.dumps(table, indent=2))
  print(evaluate.format_table(table), flush=True)
  return table


def evaluate_workdir(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Read a run's config and latest checkpoint back, and evaluate it."""
  workdir = pathlib.Path(workdir)
  config_path = workdir / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} not found: is {workdir} a bond_jax workdir?')
  c = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  config_lib.validate(c)
  cfg, task, step_cfg, tx, _ = build(c)
  abstract_state = jax.eval_shape(lambda: initial_state_shape(c, cfg, tx))
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', c.ckpt.every, c.ckpt.keep)
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = ckpts.restore_latest(checkpoint.with_sharding(abstract_state, single))
  ckpts.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint under {workdir / "checkpoints"}')
  return evaluate_state(c, cfg, task, step_cfg, state, workdir)
