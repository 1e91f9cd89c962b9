"""Measuring the train step: seconds per phase (`PhaseTimes`, config
`log.phase_times_every`) and `jax.profiler` traces of chosen steps (`Profile`,
scripts/train.py --profile_steps). The loop (`loop.py`) decides when; nothing here changes
a value the run computes."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import time
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bond_jax.algo import rollout as rollout_lib
from bond_jax.algo import step as step_lib
from bond_jax.models import xla_options
from bond_jax.run import setup as run_setup
from bond_jax.run.setup import log
from bond_jax.types import ConfigError


def phase_times_every(c: ml_collections.ConfigDict) -> int:
  """config.log.phase_times_every, 0 (off) when the config has no such field."""
  every = c.log.get('phase_times_every', 0)
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ConfigError(
      f'config.log.phase_times_every={every!r} is invalid: must be an integer >= 0 (time the '
      'phases of every that many steps; 0: never).'
    )
  return every


def _unscored(params: Any, prompt_BxP: jax.Array, valid_BxP: jax.Array, *rest: jax.Array) -> Any:
  """A reward of 0 for every row: the rollout phase with it is sampling alone."""
  del params, valid_BxP, rest
  return jnp.zeros(prompt_BxP.shape[0], jnp.float32)


class PhaseTimes:
  """Seconds per phase of the train step, measured apart from the fused step.

  The fused, jitted step cannot be timed phase by phase, so on the steps that ask for it
  the phases run again as separately jitted functions composed from `algo.step`'s (on the
  step's own state and batch, nothing donated), each waited for before the next starts:

    sample    `step.rollout` with a reward of 0 (policy and anchor samples, micro-batched
              as in the step)
    score     `step_cfg.reward_fn` of those samples, `sampling.micro_batch_size` prompts'
              samples at a time
    logprobs  `step.reference`: log pi_ref (and log pi_anchor) of the policy samples
    targets   `step.targets`
    quantile  `step.quantile_update` (with a learned quantile model only)
    update    `step.loss_and_grad`, the optimizer step, `step.move_anchor`

  Their outputs are dropped: the run's update comes from the fused step. They are compiled
  ahead of time when first met (once per prompt width), outside the clock. The sum is not
  the fused step's time (XLA overlaps and fuses across phases there), and on timed steps
  the device holds one extra set of the update's outputs (parameters, optimizer state,
  gradients) while `update` runs."""

  def __init__(self, setup: run_setup.RunSetup, mesh: jax.sharding.Mesh):
    cfg, tx = setup.step_cfg, setup.tx
    unscored = dataclasses.replace(cfg, reward_fn=_unscored)

    def sample(state, prompt_BxP, valid_BxP, reward_params):
      _, rng_policy, rng_anchor = jax.random.split(state.rng, 3)  # as `step.train_step`
      return step_lib.rollout(
        unscored, state, prompt_BxP, valid_BxP, reward_params, rng_policy, rng_anchor
      )

    def score(reward_params, samples):
      def rewards(rows, per_prompt):
        n = rollout_lib.num_micro_batches(
          rows.tokens_BxG.shape[0], cfg.sample_micro_batch * per_prompt, 'sampling.micro_batch_size'
        )
        one = lambda r: cfg.reward_fn(
          reward_params, r.prompt_BxP, r.prompt_valid_BxP, r.tokens_BxG, r.mask_BxG
        )
        if n == 1:
          return one(rows)
        return rollout_lib.join_micro_batches(
          jax.lax.map(one, rollout_lib.split_micro_batches(rows, n))
        )

      out = samples.replace(policy_reward_B=rewards(samples.policy, samples.policy_per_prompt))
      if samples.anchor is not None:
        per_prompt = samples.anchor_reward_BxA.shape[1]
        reward_BxA = rewards(samples.anchor, per_prompt).reshape(-1, per_prompt)
        out = out.replace(anchor_reward_BxA=reward_BxA)
      return out

    def update(state, samples, returns):
      (loss, _, _), grads = step_lib.loss_and_grad(
        cfg, state.params, samples, returns, step_lib.frozen_base(cfg, state)
      )
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      anchor = step_lib.move_anchor(cfg.bond, state.anchor_params, params, state.step + 1)
      return loss, params, opt_state, anchor

    functions = {
      'sample': sample,
      'score': score,
      'logprobs': functools.partial(step_lib.reference, cfg),
      'targets': functools.partial(step_lib.targets, cfg),
      'quantile': functools.partial(step_lib.quantile_update, cfg),
      'update': update,
    }
    options = xla_options.compiler_options(xla_options.mesh_platform(mesh))  # as the step's
    self._jitted = {
      k: run_setup.OnMesh(jax.jit(f, compiler_options=options), mesh) for k, f in functions.items()
    }
    self._compiled: dict[tuple[str, tuple[int, ...]], Any] = {}
    self._learned_quantiles = cfg.bond.uses_learned_quantiles

  def _run(self, name: str, width: tuple[int, ...], times: dict[str, float], *args: Any) -> Any:
    key = (name, width)
    if key not in self._compiled:
      self._compiled[key] = self._jitted[name].lower(*args).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(self._compiled[key](*args))
    times[f'time/{name}_s'] = time.perf_counter() - t0
    return out

  def measure(
    self, state: Any, prompt_BxP: jax.Array, valid_BxP: jax.Array, reward_params: Any
  ) -> dict[str, float]:
    """{'time/<phase>_s': seconds} of one step on these inputs (which it does not change)."""
    jax.block_until_ready((state, prompt_BxP, valid_BxP))
    times: dict[str, float] = {}
    run = lambda name, *args: self._run(name, prompt_BxP.shape, times, *args)
    samples = run('sample', state, prompt_BxP, valid_BxP, reward_params)
    samples = run('score', reward_params, samples)
    samples = run('logprobs', state, samples)
    returns = run('targets', state, samples)
    if self._learned_quantiles:
      run('quantile', state, samples, returns)
    run('update', state, samples, returns)
    return times


def parse_steps(text: str) -> tuple[int, ...]:
  """'5,6' or '5-7' (or a mix: '2,5-7') -> the steps, sorted; ValueError says what is wrong."""
  steps: set[int] = set()
  for part in text.split(','):
    m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
    first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not m or first < 1 or last < first:
      raise ValueError(
        f'expected steps like 5,6 or a range like 5-7 (steps count from 1), got {text!r}'
      )
    steps.update(range(first, last + 1))
  return tuple(sorted(steps))


class Profile:
  """`jax.profiler` traces of the chosen steps, on process 0: one per run of consecutive
  steps, from before its first step is dispatched until its last step's state is ready, in
  directory/steps_<first>-<last>/ (open with TensorBoard's or XProf's profile viewer, or
  Perfetto: trace.json.gz). Each step is marked as a `StepTraceAnnotation('train')`."""

  def __init__(self, directory: pathlib.Path, steps: Collection[int], first: int, last: int):
    self._dir, self._stop_at, self._on = directory, None, False
    chosen = sorted(set(steps))
    outside = [s for s in chosen if not first <= s <= last]
    if outside:
      log(f'note: profile steps {outside} are not in this run (steps {first}-{last})')
    self._ranges: dict[int, int] = {}  # first step -> last step of each run of steps
    for s in (s for s in chosen if first <= s <= last):
      start = next((a for a, b in self._ranges.items() if b == s - 1), s)
      self._ranges[start] = s

  def starts(self, step: int) -> bool:
    return step in self._ranges

  def start(self, step: int) -> None:
    self._stop_at = self._ranges[step]
    if jax.process_index() == 0:
      path = self._dir / f'steps_{step}-{self._stop_at}'
      path.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(path))
      self._on = True

  def stops(self, step: int) -> bool:
    return step == self._stop_at

  def stop(self, state: Any) -> None:
    jax.block_until_ready(state)
    self._stop_at = None
    self.close()

  def close(self) -> None:
    if self._on:
      self._on = False
      jax.profiler.stop_trace()

  def __enter__(self) -> Profile:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()  # a run stopped inside a profiled range
