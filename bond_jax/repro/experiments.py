"""Reproductions of the paper's qualitative claims (Fig. 2, 4, 5, 7), as importable functions.

Every curve comes from the real train step (`algo.step.make_train_step`) under one
configuration:

  testbed  the exact testbed (`eval/testbed.py`): rewards, KLs, quantiles and the
           divergences to pi_BoN are sums over all 4^4 sequences, no estimates;
  lm       the tiny noisy-copy LM task of configs/*_tiny.py: pi_ref is trained by
           supervised learning once per figure, metrics are Monte-Carlo estimates
           as in the paper (Section 8 of ALGORITHMS.md, `eval/estimates.py`, the
           same as the evaluation table's): KL(pi || pi_ref) from policy samples,
           quantiles and the KLs to pi_BoN from 32 pi_ref samples per prompt.

This module produces curves (dicts of equal-length lists keyed by metric, 'step'
first); `figures.py` chooses the configurations, plots them and checks the claims.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from bond_jax.algo import state as state_lib
from bond_jax.algo import step as step_lib
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.step import StepConfig
from bond_jax.data import tasks
from bond_jax.eval import estimates, testbed
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.types import parameter_free

Curve = dict[str, list[float]]
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def _log(msg: str) -> None:
  print(f'[reproduce] {msg}', flush=True)


def _run_curve(
  step_fn: Callable,
  state: state_lib.TrainState,
  batch_fn: Callable[[int], tuple],
  evaluate: Callable[[state_lib.TrainState, int], dict[str, Any]],
  *,
  steps: int,
  eval_every: int,
  label: str,
) -> Curve:
  """Train `steps` steps; evaluate at step 0 and every `eval_every` steps (and the last)."""
  curve: Curve = {'step': []}
  t0 = time.time()
  for step in range(steps + 1):
    if step % eval_every == 0 or step == steps:
      metrics = jax.device_get(evaluate(state, step))
      curve['step'].append(step)
      for k, v in metrics.items():
        curve.setdefault(k, []).append(float(v))
    if step < steps:
      state, _ = step_fn(state, *batch_fn(step))
  last = {k: round(v[-1], 3) for k, v in curve.items() if k != 'step'}
  _log(f'{label}: {steps} steps in {time.time() - t0:.0f}s, final {last}')
  return curve


# ---------------------------------------------------------------------------
# The exact testbed.


def testbed_curve(
  tb: testbed.Testbed,
  ref_params: Any,
  knobs: dict[str, Any],
  *,
  steps: int,
  batch: int,
  learning_rate: float,
  eval_every: int,
  eval_n: int,
  seed: int = 0,
  label: str = '',
) -> Curve:
  """Exact metrics (`Testbed.evaluate` against Best-of-`eval_n` of pi_ref) along training."""
  cfg = StepConfig(
    model=tb.cfg,
    sampling=tb.sampling_params(),
    reward_fn=parameter_free(tb.reward_fn),
    bond=BondConfig(**knobs),
  )
  tx, schedule = state_lib.make_optimizer(learning_rate, warmup_steps=0)
  state = state_lib.init_state(cfg.bond, ref_params, ref_params, tx, jax.random.PRNGKey(seed))
  evaluate = jax.jit(lambda params: tb.evaluate(params, ref_params, eval_n))
  prompt, valid = tb.prompts(batch)
  return _run_curve(
    step_lib.make_train_step(cfg, tx, schedule),
    state,
    lambda _: (prompt, valid),
    lambda s, _: evaluate(s.params),
    steps=steps,
    eval_every=eval_every,
    label=f'testbed {label}',
  )


# ---------------------------------------------------------------------------
# The tiny LM task.


def load_config(name: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """configs/`name` with dotted-field overrides, e.g. {'bond.beta': 0.0}; validated."""
  c = config_lib.load_config_file(CONFIGS / name)
  for field, value in (overrides or {}).items():
    *path, leaf = field.split('.')
    node = c
    for part in path:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'{name} has no field {field!r}')
    node[leaf] = value
  config_lib.validate(c)
  return c


_REFERENCE_FIELDS = ('seed', 'model', 'task', 'reference')


@dataclasses.dataclass(frozen=True)
class LMTask:
  """The task, its model and its pi_ref (trained once, shared by every curve)."""

  config: ml_collections.ConfigDict  # the config pi_ref was made from
  cfg: model_lib.ModelConfig
  task: tasks.NoisyCopy
  sp: sampling.SamplingParams  # exact sampling (temperature 1, no truncation) for evaluation
  ref_params: Any


def lm_task(c: ml_collections.ConfigDict) -> LMTask:
  """pi_ref by supervised learning on noisy demonstrations: `run.setup.train_reference`, the
  function (and random stream) a training run uses, so it depends only on the config's seed,
  model, task and reference fields."""
  cfg = config_lib.model_config(c)
  task = config_lib.task(c, cfg)
  sp = sampling.SamplingParams(
    max_new_tokens=c.sampling.max_new_tokens, eos_id=tasks.EOS, pad_id=tasks.PAD
  )
  ref_params = run_setup.train_reference(c, cfg, task)
  return LMTask(config=c, cfg=cfg, task=task, sp=sp, ref_params=ref_params)


# Scoring samples compiles once per model shape and evaluator (reward_fn is static).
_score = jax.jit(estimates.score_samples, static_argnames=('cfg', 'sp', 'per_prompt', 'reward_fn'))


def lm_evaluator(
  lm: LMTask,
  *,
  num_prompts: int = 64,
  ref_samples: int = 32,
  policy_samples: int = 4,
  n: int | None = None,
  seed: int = 1,
) -> Callable[[Any, int], dict[str, jax.Array]]:
  """evaluate(params, step): the section 8 metrics of `eval.estimates.policy_metrics` (with
  the KLs to Best-of-`n` of pi_ref when `n` is set) on fixed held-out prompts, from
  `ref_samples` pi_ref and `policy_samples` policy samples per prompt, fresh each step."""
  key = jax.random.fold_in(jax.random.PRNGKey(lm.config.seed), 1000 + seed)
  prompt, valid = lm.task.prompts(key, num_prompts)
  reward_fn = parameter_free(lm.task.reward)
  metrics = jax.jit(lambda policy, ref: estimates.policy_metrics(policy, ref, kl_n=n))

  def evaluate(params, step):
    k_ref, k_pol = jax.random.split(jax.random.fold_in(key, step))
    score = lambda sample_params, rng, per_prompt: _score(
      lm.cfg,
      sample_params,
      params,
      lm.ref_params,
      prompt,
      valid,
      rng,
      lm.sp,
      per_prompt,
      reward_fn,
      None,
    )
    return metrics(score(params, k_pol, policy_samples), score(lm.ref_params, k_ref, ref_samples))

  return evaluate


def lm_curve(
  lm: LMTask,
  c: ml_collections.ConfigDict,
  *,
  eval_every: int,
  evaluate: Callable[[Any, int], dict[str, jax.Array]],
  seed: int = 0,
  label: str = '',
) -> Curve:
  """Train from pi_ref as config `c` says (bond, sampling, optim and train fields); the
  curve holds `evaluate`'s metrics every `eval_every` steps."""
  for field in _REFERENCE_FIELDS:
    if c[field] != lm.config[field]:
      raise ValueError(f'config.{field} differs from the one pi_ref was trained with.')
  cfg = config_lib.step_config(
    c, lm.cfg, parameter_free(lm.task.reward), config_lib.sampling_params(c)
  )
  tx, schedule = run_setup.optimizer(c)
  state = state_lib.init_state(cfg.bond, lm.ref_params, lm.ref_params, tx, jax.random.PRNGKey(seed))
  data_key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 2000 + seed)
  batch = c.train.batch_size
  return _run_curve(
    step_lib.make_train_step(cfg, tx, schedule),
    state,
    lambda i: lm.task.prompts(jax.random.fold_in(data_key, i), batch),
    lambda s, i: evaluate(s.params, i),
    steps=c.train.num_steps,
    eval_every=eval_every,
    label=f'lm {label}',
  )
