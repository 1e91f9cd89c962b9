"""The loop's asynchronous dispatch, phase times and profiles (run.loop), on cheap runs.

Every run here shares one setup and one compiled step: test_loop's micro config with a
random one-layer pi_ref (no supervised pre-training) and a reward that is NaN for the
prompts named in its reward parameters (none unless a test poisons some), so the runs
differ only in what the loop does around the step. The final evaluation is left out: each
run's last state is captured instead.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.run import loop as trainer
from bond_jax.run import metrics, profiling
from bond_jax.run import setup as run_setup
from bond_jax.types import ConfigError
from tests.run.test_loop import micro_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMING = ('tokens_per_s', 'step_time_s')  # wall-clock metrics, the only ones that may differ
POISON_ROWS = 8  # the reward parameters' shape: prompts whose reward is NaN (-1: none)
PHASES = ('sample', 'score', 'logprobs', 'targets', 'update')
# Before the fixture patches them:
BUILD, JIT_TRAIN_STEP, BY_WIDTH = run_setup.build, run_setup.jit_train_step, trainer._by_width
WRITE = metrics.MetricWriter.write


class _Runs:
  """trainer.run on the shared setup; the last state of each run is kept."""

  def __init__(self):
    self._setup = None
    self._step = None
    self.final = {}

  def build(self, c, mesh):
    if self._setup is None:
      setup = BUILD(c, mesh)
      cfg = dataclasses.replace(setup.cfg, num_layers=1)
      base = setup.step_cfg.reward_fn

      def reward(poison_KxP, prompt_BxP, valid_BxP, response_BxG, mask_BxG):
        r_B = base(None, prompt_BxP, valid_BxP, response_BxG, mask_BxG)
        hit_B = jnp.any(jnp.all(prompt_BxP[:, None, :] == poison_KxP[None], axis=-1), axis=-1)
        return jnp.where(hit_B, jnp.nan, r_B)

      def reference(shardings):
        init = jax.jit(model_lib.init_params, static_argnums=0)
        return jax.device_put(init(cfg, jax.random.PRNGKey(1)), shardings)

      self._setup = dataclasses.replace(
        setup,
        cfg=cfg,
        step_cfg=dataclasses.replace(setup.step_cfg, model=cfg, reward_fn=reward),
        reference=reference,
      )
    setup = self._setup
    prompts = copy.deepcopy(setup.prompts)  # a fresh stream for each run
    poison_KxP = np.full((POISON_ROWS, setup.eval_prompts[0].shape[1]), -1, np.int32)
    probe = copy.deepcopy(setup.prompts)
    batches = [probe.next_batch()[0][0] for _ in range(max(self.poison, default=0))]
    for i, k in enumerate(self.poison):
      poison_KxP[i] = batches[k - 1]
    return dataclasses.replace(setup, prompts=prompts, reward_params=poison_KxP)

  def jit_train_step(self, setup, state_sharding, batch_sharding):
    if self._step is None:  # one jitted step: compiled once for all runs
      self._step = JIT_TRAIN_STEP(setup, state_sharding, batch_sharding)
    return self._step

  def by_width(self, compiled, shape, jitted):
    step = BY_WIDTH(compiled, shape, jitted)

    def dispatch(*args):
      self.events.append('dispatch')
      return step(*args)

    return dispatch

  def write(self, writer, step, values):
    self.events.append(f'read {step}')
    return WRITE(writer, step, values)

  def run(self, workdir, c, poison=(), **kwargs):
    """The run's metrics rows; self.events: 'dispatch' at each step's call and 'read N'
    when step N's row is written."""
    self.poison, self.events = poison, []
    trainer.run(c, workdir, **kwargs)
    return _rows(workdir)

  def evaluate_state(self, c, setup, state, workdir):
    self.final[pathlib.Path(workdir)] = state
    return {}


@pytest.fixture(scope='module')
def runs():
  r = _Runs()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(run_setup, 'build', r.build)
    patch.setattr(run_setup, 'jit_train_step', r.jit_train_step)
    patch.setattr(trainer, 'evaluate_state', r.evaluate_state)
    patch.setattr(trainer, '_by_width', r.by_width)
    patch.setattr(metrics.MetricWriter, 'write', lambda *args: r.write(*args))
    yield r


def _rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _strip(rows: list[dict]) -> list[dict]:
  return [
    {k: v for k, v in r.items() if k not in TIMING and not k.startswith('time/')} for r in rows
  ]


def _checkpoints(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _config(num_steps: int, every: int):
  c = micro_config(num_steps)
  c.ckpt.every, c.ckpt.keep = every, 10
  return c


def test_async_dispatch_logs_saves_and_trains_as_reading_every_step(runs, tmp_path):
  """Reading each step's metrics after the next is dispatched changes nothing: the same
  rows, checkpoints and parameters as reading them at once (`synchronous=True`)."""
  sync, lazy = tmp_path / 'sync', tmp_path / 'async'
  sync_rows = runs.run(sync, _config(6, 4), synchronous=True)
  assert runs.events == [e for n in range(1, 7) for e in ('dispatch', f'read {n}')]
  lazy_rows = runs.run(lazy, _config(6, 4))
  # Step n is read once step n + 1 is dispatched, except where the next step needs it:
  # the checkpoint of step 4 (its metadata counts bad steps) and the last step.
  assert runs.events == [
    'dispatch', 'dispatch', 'read 1', 'dispatch', 'read 2', 'dispatch', 'read 3', 'read 4',
    'dispatch', 'dispatch', 'read 5', 'read 6',
  ]  # fmt: skip
  assert [r['step'] for r in lazy_rows] == [1, 2, 3, 4, 5, 6]
  assert _strip(lazy_rows) == _strip(sync_rows)
  assert all(r['step_time_s'] > 0 and r['tokens_per_s'] > 0 for r in lazy_rows)
  assert _checkpoints(lazy) == _checkpoints(sync) == [4, 6]
  a, b = runs.final[sync], runs.final[lazy]
  assert int(a.step) == int(b.step) == 6
  for field in ('params', 'anchor_params', 'opt_state', 'rng'):
    jax.tree.map(
      lambda x, y, f=field: np.testing.assert_array_equal(x, y, err_msg=f),
      getattr(a, field),
      getattr(b, field),
    )


def test_async_dispatch_stops_at_the_same_bad_step(runs, tmp_path):
  """train.max_bad_steps bad steps in a row stop the run at the same step, with the same
  rows and checkpoints, though the next step was dispatched before the last bad one was
  read."""
  c = _config(8, 4)
  c.train.max_bad_steps = 2
  message = r'^steps 5-6 \(2 in a row\) had NaN or Inf values .* those of step 4; stopping'
  with pytest.raises(trainer.RunError, match=message):
    runs.run(tmp_path, c, poison=(3, 5, 6))
  rows = _rows(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r['skipped'] for r in rows] == [0, 0, 1, 0, 1, 1]
  assert [r['skipped_steps'] for r in rows] == [0, 0, 1, 1, 2, 3]
  assert _checkpoints(tmp_path) == [4]


def test_phase_times_and_a_profile_of_the_chosen_steps(runs, tmp_path):
  """log.phase_times_every=2 puts positive time/<phase>_s in the rows of steps 2 and 4
  only; profile_steps=(1, 3) traces steps 1 and 3, each alone; neither changes what is
  logged or trained."""
  c = _config(4, 4)
  with c.unlocked():
    c.log.phase_times_every = 2
  rows = runs.run(tmp_path / 'timed', c, profile_steps=(1, 3))
  for row in rows:
    times = {k: v for k, v in row.items() if k.startswith('time/')}
    if row['step'] % 2:
      assert not times, row
    else:
      assert set(times) == {f'time/{p}_s' for p in PHASES}, row
      assert all(v > 0 for v in times.values()), times

  # One trace per run of consecutive steps, each holding its steps alone.
  traces = sorted((tmp_path / 'timed' / 'profile').glob('*/plugins/profile/*/*.xplane.pb'))
  assert [t.relative_to(tmp_path / 'timed' / 'profile').parts[0] for t in traces] == [
    'steps_1-1',
    'steps_3-3',
  ]
  for trace, step in zip(traces, (1, 3), strict=True):
    (events,) = trace.parent.glob('*.trace.json.gz')
    steps = {
      int(e['args']['step_num'])
      for e in json.loads(gzip.decompress(events.read_bytes()))['traceEvents']
      if e.get('name') == 'train' and 'step_num' in e.get('args', {})
    }
    assert steps == {step}

  plain = runs.run(tmp_path / 'plain', _config(4, 4), synchronous=True)
  assert _strip(rows) == _strip(plain)
  jax.tree.map(
    np.testing.assert_array_equal,
    runs.final[tmp_path / 'timed'].params,
    runs.final[tmp_path / 'plain'].params,
  )


def test_profile_steps_are_parsed_and_a_bad_value_is_one_line(tmp_path):
  assert profiling.parse_steps('5,6') == (5, 6)
  assert profiling.parse_steps('5-7') == (5, 6, 7)
  assert profiling.parse_steps('2, 6-7,3') == (2, 3, 6, 7)
  for bad in ('x', '0', '7-5', '5,', '-1'):
    with pytest.raises(ValueError, match=r'^expected steps like 5,6 or a range like 5-7'):
      profiling.parse_steps(bad)
  cmd = [sys.executable, 'scripts/train.py', f'--config={ROOT / "configs" / "jbond_tiny.py"}']
  proc = subprocess.run(
    [*cmd, f'--workdir={tmp_path / "run"}', '--profile_steps=5-x'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
    'error: --profile_steps: expected steps like 5,6 or a range like 5-7 (steps count from '
    "1), got '5-x'"
  )
  assert not (tmp_path / 'run').exists()


def test_phase_times_every_must_be_a_non_negative_integer(tmp_path):
  c = micro_config(2)
  with c.unlocked():
    c.log.phase_times_every = -1
  with pytest.raises(ConfigError, match=r'^config\.log\.phase_times_every=-1 is invalid'):
    trainer.run(c, tmp_path)
