"""Reproductions of the paper's qualitative claims (Fig. 2, 4, 5, 7), as importable functions.

Every curve comes from the real train step (`algo.step.make_train_step`) under one
configuration:

  testbed  the exact testbed (`eval/testbed.py`): rewards, KLs, quantiles and the
           divergences to pi_BoN are sums over all 4^4 sequences, no estimates;
  lm       the tiny noisy-copy LM task of configs/*_tiny.py: pi_ref is trained by
           supervised learning once per figure, metrics are Monte-Carlo estimates
           as in the paper (Section 8 of ALGORITHMS.md): KL(pi || pi_ref) from
           policy samples, quantiles and the KLs to pi_BoN from 32 pi_ref samples
           per prompt.

This module produces curves (dicts of equal-length lists keyed by metric, 'step'
first); `figures.py` chooses the configurations, plots them and checks the claims.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bond_jax.algo import bon
from bond_jax.algo import state as state_lib
from bond_jax.algo import step as step_lib
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.step import StepConfig
from bond_jax.data import tasks
from bond_jax.eval import testbed
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


def _log_bon_weight(lt_count: jax.Array, le_count: jax.Array, total: int, n: int) -> jax.Array:
  """log pi_BoN(y) / pi_ref(y) = log((F^n - F_-^n) / (F - F_-)) for y's reward level, with
  F = le_count / total, F_- = lt_count / total: Theorem 1 applied to reward *levels*, the
  mass of a level shared uniformly by its sequences (random tie-breaking)."""
  log_lt, log_le = jnp.log(lt_count / total), jnp.log(le_count / total)
  return bon.log_pi_bon(log_lt, log_le, n) - jnp.log((le_count - lt_count) / total)


def _lm_metrics(
  lm: LMTask, params: Any, prompt_BxP, valid_BxP, ref_out, pol_out, n: int | None
) -> dict[str, jax.Array]:
  """Monte-Carlo metrics from K pi_ref samples and M policy samples per prompt."""
  b = prompt_BxP.shape[0]
  k = ref_out.tokens_BxG.shape[0] // b
  m = pol_out.tokens_BxG.shape[0] // b

  def score(out, reps):
    prompt, valid = jnp.repeat(prompt_BxP, reps, 0), jnp.repeat(valid_BxP, reps, 0)
    reward = lm.task.reward(prompt, valid, out.tokens_BxG, out.mask_BxG).reshape(b, reps)
    logp = lambda p: (
      sampling.sequence_logprobs(lm.cfg, p, prompt, valid, out.tokens_BxG, out.mask_BxG)
      .sum(-1)
      .reshape(b, reps)
    )
    return reward, logp(params), logp(lm.ref_params)

  r_ref_BxK, logp_pi_ref_BxK, logp_ref_ref_BxK = score(ref_out, k)
  r_pol_BxM, logp_pi_BxM, logp_ref_BxM = score(pol_out, m)
  # Each policy sample against its prompt's K pi_ref samples (Eq. 10's counts).
  lt_BxM, le_BxM = bon.mc_counts(r_pol_BxM, r_ref_BxK[:, None, :])
  out = {
    'reward': jnp.mean(r_pol_BxM),
    'kl_ref': jnp.mean(logp_pi_BxM - logp_ref_BxM),
    # The training estimator: y counted among the K samples, so log p_le is finite.
    'log_quantile': jnp.mean(bon.mc_log_quantile(r_pol_BxM, r_ref_BxK[:, None, :])),
  }
  if n is None:
    return out
  # Backward KL(pi || pi_BoN) = E_pi[log pi - log pi_ref - log w(y)], with F, F_- of y's
  # level among {y} and the K samples (so the level of y always has mass).
  out['kl_bwd'] = jnp.mean(
    logp_pi_BxM - logp_ref_BxM - _log_bon_weight(lt_BxM, 1.0 + le_BxM, k + 1, n)
  )
  # Forward KL(pi_BoN || pi) = E_{y ~ BoN}[log pi_ref + log w - log pi], y the best of n of
  # the K samples drawn without replacement: rank j (1 = worst) has weight C(j-1, n-1)/C(K, n)
  # (bon.bon_expected_max's weights), ties ranked by sample index.
  rank_BxK = jnp.argsort(jnp.argsort(r_ref_BxK, axis=-1, stable=True), axis=-1)
  log_c = lambda a, c: (
    (math.lgamma(a + 1) - math.lgamma(c + 1) - math.lgamma(a - c + 1)) if a >= c else -math.inf
  )
  log_w_K = jnp.asarray([log_c(j, n - 1) - log_c(k, n) for j in range(k)], jnp.float32)
  weight_BxK = jnp.exp(log_w_K[rank_BxK])
  # Each pi_ref sample's level among the K samples themselves (F, F_- over K).
  lt_BxK, le_BxK = bon.mc_counts(r_ref_BxK, r_ref_BxK[:, None, :])
  log_w_BxK = _log_bon_weight(lt_BxK, le_BxK, k, n)
  fwd_B = jnp.sum(weight_BxK * (logp_ref_ref_BxK + log_w_BxK - logp_pi_ref_BxK), -1)
  out['kl_fwd'] = jnp.mean(fwd_B)
  return out


def lm_evaluator(
  lm: LMTask,
  *,
  num_prompts: int = 64,
  ref_samples: int = 32,
  policy_samples: int = 4,
  n: int | None = None,
  seed: int = 1,
) -> Callable[[Any, int], dict[str, jax.Array]]:
  """evaluate(params, step): MC metrics on fixed held-out prompts, fresh samples per step."""
  key = jax.random.fold_in(jax.random.PRNGKey(lm.config.seed), 1000 + seed)
  prompt, valid = lm.task.prompts(key, num_prompts)
  metrics = jax.jit(lambda p, r, q: _lm_metrics(lm, p, prompt, valid, r, q, n))

  def evaluate(params, step):
    k_ref, k_pol = jax.random.split(jax.random.fold_in(key, step))
    ref = sampling.sample_jit(
      lm.cfg, lm.ref_params, prompt, valid, k_ref, lm.sp, num_samples=ref_samples
    )
    pol = sampling.sample_jit(
      lm.cfg, params, prompt, valid, k_pol, lm.sp, num_samples=policy_samples
    )
    return metrics(params, ref, pol)

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
