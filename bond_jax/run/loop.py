"""The training loop: config -> setup -> BOND updates -> checkpoints -> BOND table.

`run` is what `scripts/train.py` calls. It is resumable: with an existing workdir it
restores the latest usable checkpoint (policy, anchor, reference, optimizer, step and RNG,
plus the prompt stream's position, saved as that checkpoint's metadata) and continues with
the next step and the next unseen batch, so a resumed run reproduces an uninterrupted one.

Checkpoints are written in the background while training goes on (`checkpoint.py`); the
run waits for the last one before it returns or stops on a signal. A Hugging Face run's
pi_ref is not in them: it is reloaded from model.hf_checkpoint, whose checksum each
checkpoint records and a resume checks (`guards.reference_reloader`).

The host does not wait for the device each step: step t + 1 is dispatched before step t's
metrics are read, and the read comes as soon as t + 1 is queued. A step whose metrics or
state something needs at once (a checkpoint: its metadata carries the bad-step counters;
an evaluation; a signal or preemption; a profile's last step; the run's last step) is read
before the next one is dispatched. So the same rows, checkpoints and stops come out as
with a read after every step (`run(..., synchronous=True)`, what tests compare with); a
run stopped by `train.max_bad_steps` has dispatched one more step, whose result it drops.
`step_time_s` is the time between two steps' metric reads (with the device kept busy, the
step's own time; on a timed or profiled step, from after the timing or the trace's start),
`tokens_per_s` the step's generated tokens over it.

Measuring, off by default: `log.phase_times_every=k` (read as 0 when a config lacks it)
times each phase of every k-th step as separately jitted functions on the step's own inputs
(`profiling.PhaseTimes`: time/sample_s, time/score_s, time/logprobs_s, time/targets_s,
time/update_s, written in that step's row; the step itself still runs fused, so values do
not change); `run(..., profile_steps=...)` (scripts/train.py --profile_steps) writes a
`jax.profiler` trace of exactly those steps into workdir/profile/ (process 0).

Several processes (`jax.distributed`, see scripts/train.py) run this same loop: the mesh
spans all their devices, each feeds its own rows of the batch (`_global`), Orbax saves and
restores every process's shards, and only process 0 writes config.json, metrics and
summary.json.

What can go wrong, and what happens:

  SIGTERM / SIGINT     the current step finishes, is checkpointed, and `Preempted` is
                       raised (the script exits 128 + signal); a second signal stops at
                       once. Multi-host: JAX's preemption service picks the step.
  a damaged checkpoint skipped with a warning; the newest good one is restored
                       (`checkpoint.py`), and logs are cut back to it (`metrics.py`).
  NaN / Inf            the step changes nothing (`step.keep_if`) and is counted;
                       `train.max_bad_steps` such steps in a row stop the run.
  a changed config     resuming with other shapes, algorithm or data stops, listing the
                       fields; run-length, logging, checkpoint, evaluation and mesh
                       fields may change, and each change is appended to
                       config_changes.jsonl.
  bad input            a one-line `ConfigError` or `RunError` before anything compiles
                       (`guards.py`): an unwritable workdir, a reward of the wrong shape.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import jax
import ml_collections

from bond_jax.algo import state as state_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import hf, lora, sharding
from bond_jax.run import checkpoint, evaluation, guards, memory_plan, metrics, profiling
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.run.evaluation import load_workdir
from bond_jax.run.guards import Preempted, RunError
from bond_jax.run.setup import log
from bond_jax.types import ConfigError

_NONFINITE_FLAGS = ('nonfinite_rewards', 'nonfinite_logprobs', 'nonfinite_loss', 'nonfinite_grads')


def _by_width(compiled: Any, shape: tuple[int, ...], jitted: Any) -> Any:
  """The step compiled ahead of time for the first batch's prompt shape; a batch padded to
  another width (`data.prompt_bucket`) goes through the jitted step, compiled once per
  width."""

  def step(state: Any, prompt: jax.Array, valid: jax.Array, reward_params: Any) -> Any:
    fn = compiled if prompt.shape == shape else jitted
    return fn(state, prompt, valid, reward_params)

  return step


def _global(
  batch_sharding: jax.sharding.NamedSharding, global_rows: int, *local: Any
) -> list[jax.Array]:
  """Global batch arrays from each process's rows."""
  return [
    jax.make_array_from_process_local_data(batch_sharding, x, (global_rows, *x.shape[1:]))
    for x in local
  ]


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose metrics are not read yet."""

  step: int  # as logged: the state's step after it
  metrics: dict[str, jax.Array]
  extra: dict[str, float]  # measured on the host (phase times)
  bad: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------
# The loop.


class _StopSignals:
  """SIGTERM and SIGINT ask the loop to stop after the current step, with a checkpoint; a
  second signal stops at once. Single-process only: on several hosts a local stop would
  leave the others waiting, and JAX's preemption service handles SIGTERM there."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> _StopSignals:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def run(
  c: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  *,
  profile_steps: Collection[int] = (),
  synchronous: bool = False,
) -> dict[str, Any]:
  """Train (or resume) and evaluate. Returns the summary written to summary.json.

  profile_steps: steps (as logged, from 1) to trace with `jax.profiler` into
  workdir/profile/. synchronous: read each step's metrics before the next is dispatched
  (the same results, slower; for comparison)."""
  config_lib.validate(c)  # before anything is loaded or compiled
  guards.check_max_bad_steps(c)
  profiling.phase_times_every(c)
  workdir = guards.prepare_workdir(workdir)
  ckpts = checkpoint.Checkpoints(
    workdir / 'checkpoints', c.ckpt.every, c.ckpt.keep, asynchronous=True
  )
  try:
    guards.check_resume_config(workdir, c, ckpts.latest_step)
    mesh = run_setup.make_mesh(c)
    setup = run_setup.build(c, mesh)
    guards.check_reward(c, setup)
    ckpts.reload = guards.reference_reloader(c, setup)
    with guards.reward_failures('; the run stopped: rerun the command to resume it'):
      summary = _train(c, workdir, mesh, setup, ckpts, profile_steps, synchronous)
    ckpts.wait()  # the last save, written while the final evaluation ran
    return summary
  except checkpoint.CheckpointError as e:
    raise RunError(str(e)) from e
  finally:
    try:
      ckpts.close()  # waits for a save still in flight
    except checkpoint.CheckpointError as e:  # only when another error is on its way out
      log(f'warning: {e}')


def _train(
  c: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  mesh: jax.sharding.Mesh,
  setup: run_setup.RunSetup,
  ckpts: checkpoint.Checkpoints,
  profile_steps: Collection[int] = (),
  synchronous: bool = False,
) -> dict[str, Any]:
  if not setup.step_cfg.sampling.is_exact:
    log(
      f'note: training samples use temperature={c.sampling.temperature}, '
      f'top_k={c.sampling.top_k}, top_p={c.sampling.top_p}; they are not draws from pi, '
      'so the KL metrics are estimates under that sampler.'
    )
  abstract = run_setup.abstract_state(setup)
  state_sharding = sharding.param_shardings(abstract, mesh)
  batch_sharding = sharding.data_sharding(mesh)
  restored = ckpts.restore_latest(
    checkpoint.with_sharding(abstract, state_sharding), move_aside=True
  )
  counters = {'skipped_steps': 0, 'bad_in_a_row': 0}
  reference = None  # guards.reference_record of a Hugging Face run's pi_ref (not saved)
  if restored is not None:
    for step, why in restored.skipped:
      log(f'warning: skipped checkpoint step {step} ({why}); moved it to {ckpts.directory}.skipped')
    setup.prompts.restore(restored.metadata['data_position'])
    counters.update({k: restored.metadata[k] for k in counters if k in restored.metadata})
    reference = restored.metadata.get(guards.REFERENCE)  # checked when pi_ref was reloaded
  # The first batch before pi_ref is made and the step compiled: bad data fails fast.
  first_batch = setup.prompts.next_batch()
  if restored is None:
    ref_params = setup.reference(state_sharding.ref_params)
    reference = guards.reference_record(c)

    def init(ref_params: Any) -> state_lib.TrainState:
      trained = run_setup.trained_params(setup.cfg, ref_params, c.seed)
      rng = run_setup.stream_key(c.seed, run_setup.STATE_STREAM)
      return state_lib.init_state(
        setup.step_cfg.bond, trained, ref_params, setup.tx, rng, setup.ref_dtype
      )

    state = jax.jit(init, out_shardings=state_sharding)(ref_params)
  else:
    state = restored.state
    log(f'resumed from {ckpts.directory} at step {int(state.step)}')
  sharding.assert_big_tensors_sharded(state.params, mesh)
  if reference is not None:
    log(f'pi_ref is not saved in checkpoints: reloaded from {reference["path"]} on resume')

  step_fn = run_setup.jit_train_step(setup, state_sharding, batch_sharding)
  start = int(state.step)
  if start < c.train.num_steps and jax.process_index() == 0:
    (workdir / 'summary.json').unlink(missing_ok=True)  # written again at the end
  writer = metrics.MetricWriter(
    workdir, c.train.num_steps, start, c.log.tensorboard, c.log.progress
  )
  reference_meta = {guards.REFERENCE: reference} if reference is not None else {}
  leave_out = ('ref_params',) if reference is not None else ()

  def save(step: int, force: bool = False) -> None:
    meta = {'data_position': setup.prompts.state(), **counters, **reference_meta}
    ckpts.save(step, state, force=force, metadata=meta, leave_out=leave_out)

  if start < c.train.num_steps:
    # Compiled before the first step, and every process waits for the others, so that
    # they start it together (one may load the step from a compilation cache while another
    # compiles it).
    # On a TPU or GPU it is also checked against the devices' memory (`memory_plan`): a step
    # that will not fit stops here with the planner command, not at its first allocation.
    t0 = time.time()
    prompt, valid = _global(batch_sharding, c.train.batch_size, *first_batch)
    if jax.devices()[0].platform in ('tpu', 'gpu'):
      compiled = memory_plan.fit_or_stop(step_fn, state, prompt, valid, setup.reward_params)
    else:
      compiled = step_fn.lower(state, prompt, valid, setup.reward_params).compile()
    step_fn = _by_width(compiled, prompt.shape, step_fn)
    log(f'train step compiled in {time.time() - t0:.0f}s')
    guards.align_processes('bond_jax_first_step')
  every = profiling.phase_times_every(c)
  phases = profiling.PhaseTimes(setup, mesh) if every else None
  profile = profiling.Profile(workdir / 'profile', profile_steps, start + 1, c.train.num_steps)
  t_last = time.time()

  def read(p: _Pending, evaluate_state: Any = None) -> None:
    """Wait for step p.step's metrics, count a bad step, evaluate `evaluate_state` (the
    step's state) if given, and write the step's row."""
    nonlocal t_last
    m = jax.device_get(p.metrics)
    now = time.time()
    m['tokens_per_s'] = float(m['generated_tokens']) / max(now - t_last, 1e-9)
    m['step_time_s'] = now - t_last
    t_last = now
    p.bad = [k for k in _NONFINITE_FLAGS if m[k]]
    counters['bad_in_a_row'] = counters['bad_in_a_row'] + 1 if p.bad else 0
    counters['skipped_steps'] += bool(p.bad)
    m['skipped_steps'] = counters['skipped_steps']
    m.update(p.extra)
    if evaluate_state is not None:
      m.update(evaluation.during_training(c, setup, evaluate_state))
    writer.write(p.step, m)
    if p.bad:
      log(
        f'warning: step {p.step} skipped ({", ".join(p.bad)}): parameters unchanged '
        f'({counters["bad_in_a_row"]} in a row of at most {c.train.max_bad_steps})'
      )

  def stop_if_bad(p: _Pending) -> None:
    if counters['bad_in_a_row'] >= c.train.max_bad_steps:
      n = counters['bad_in_a_row']
      steps = f'steps {p.step + 1 - n}-{p.step} ({n} in a row)' if n > 1 else f'step {p.step}'
      raise RunError(
        f'{steps} had NaN or Inf values (last: {", ".join(p.bad)}); each was skipped, so the '
        f'parameters are those of step {p.step - n}; stopping '
        f'(config.train.max_bad_steps={c.train.max_bad_steps}).'
      )

  pending: _Pending | None = None  # the step before the one being dispatched, not read yet
  with _StopSignals() as stop, profile:
    try:
      for n in range(start + 1, c.train.num_steps + 1):  # n: the step as logged and saved
        batch = first_batch if n == start + 1 else setup.prompts.next_batch()
        prompt, valid = _global(batch_sharding, c.train.batch_size, *batch)
        timed = bool(every) and n % every == 0
        if pending is not None and (timed or profile.starts(n)):  # an idle device first
          read(pending)
          stop_if_bad(pending)
          pending = None
        times = phases.measure(state, prompt, valid, setup.reward_params) if timed else {}
        if profile.starts(n):
          profile.start(n)
        if timed or profile.starts(n):
          t_last = time.time()  # the step's time is its own
        with jax.profiler.StepTraceAnnotation('train', step_num=n):
          state, m = step_fn(state, prompt, valid, setup.reward_params)
        if pending is not None:  # step n - 1, read while step n runs
          read(pending)
          stop_if_bad(pending)
        pending = _Pending(n, m, times)
        # What needs this step's metrics or state before the next step is dispatched (the
        # state is donated to it): a checkpoint (its metadata holds the bad-step counters;
        # saved when `checkpoint.Checkpoints`' policy says: every ckpt.every steps and at a
        # preemption), an evaluation, a stop, the end of a profile, the last step.
        evaluate = bool(c.eval.every) and n % c.eval.every == 0
        preempted = stop.signum is not None or ckpts.preempted(n)
        if (
          synchronous
          or evaluate
          or preempted
          or n % c.ckpt.every == 0
          or profile.stops(n)
          or n == c.train.num_steps
        ):
          read(pending, state if evaluate else None)
          if profile.stops(n):
            profile.stop(state)
          save(n)
          if preempted:
            _preempted(ckpts, save, n, stop.signum or signal.SIGTERM)
          stop_if_bad(pending)
          pending = None
    finally:
      writer.close()
    save(int(state.step), force=True)
    if stop.signum is not None:  # arrived during the last step's save
      _preempted(ckpts, save, int(state.step), stop.signum)
  return evaluate_state(c, setup, state, workdir)


def _preempted(
  ckpts: checkpoint.Checkpoints, save: Callable[..., None], step: int, signum: int
) -> None:
  save(step, force=True)
  ckpts.wait()  # on disk, with its manifest, before the process goes
  raise Preempted(
    f'stopped by {signal.Signals(signum).name} after step {step}, which is saved in '
    f'{ckpts.directory}: rerun the same command to resume.',
    signum,
  )


def evaluate_state(
  c: ml_collections.ConfigDict,
  setup: run_setup.RunSetup,
  state: state_lib.TrainState,
  workdir: pathlib.Path,
) -> dict[str, Any]:
  """The run's last phase: the table of `state`'s policy, printed and in summary.json.
  Every process computes it (the sampling is sharded over all devices); process 0 alone
  prints it and writes summary.json."""
  return evaluation.summary(c, setup, state, workdir)


def export_policy(
  workdir: str | pathlib.Path, out_dir: str | pathlib.Path, adapters_only: bool = False
) -> pathlib.Path:
  """The latest checkpoint's policy as a Hugging Face checkpoint directory (gathered to the
  host one tensor at a time; written by process 0). A LoRA run's adapters are folded into
  the weights (`lora.fold`); with `adapters_only`, they are written alone as a PEFT adapter
  directory for the run's base checkpoint (`hf.export_peft`)."""
  c, setup, state = load_workdir(workdir)
  cfg = setup.cfg
  if adapters_only:
    if not cfg.lora.on:
      raise ConfigError(
        '--adapters_only: this run trains the whole policy (model.lora.rank=0); export it '
        'without the flag.'
      )
    base = c.model.hf_checkpoint if c.task.name == 'hf' else ''
    return pathlib.Path(hf.export_peft(cfg, state.params, out_dir, base_model=base))
  tokenizer_dir = None
  if c.task.name == 'hf':
    tokenizer_dir = config_lib.tokenizer_path(c)
  policy = lora.fold(cfg.lora, evaluation.model_of(setup, state))
  out = hf.export_hf(model_lib.base_config(cfg), policy, out_dir, tokenizer_dir=tokenizer_dir)
  return pathlib.Path(out)
