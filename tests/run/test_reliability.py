"""A run survives what happens to long runs: signals, kills, damaged checkpoints, NaN
rewards, changed configs and bad input, each with a one-line message.

One background thread drives real `scripts/train.py` processes (sharing the session's
persistent compilation cache, tests/conftest.py, so they read the micro config's programs
that the tests before them compiled, and only the first compiles the rest) while the
in-process tests run:

  resumed   stopped by SIGTERM, rerun, killed by SIGKILL at a seeded random step between
            two checkpoints (tests/run/sigkill_at_step.py), rerun to the end
  straight  the same command uninterrupted: what `resumed` must equal, bit for bit
  corrupt   copies of `straight` with the latest checkpoint's data file truncated: one
            rerun with more steps' worth of safe config changes, one evaluated
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import errno
import json
import os
import pathlib
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.algo import step as step_lib
from bond_jax.models import decoder as model_lib
from bond_jax.run import checkpoint, guards, metrics
from bond_jax.run import config as config_lib
from bond_jax.run import loop as trainer
from bond_jax.run import setup as run_setup
from bond_jax.types import ConfigError
from tests.run.test_loop import micro_config

BUILD = run_setup.build  # before any test patches it
ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS, EVERY, KEEP = 36, 12, 3


def _micro_flags() -> list[str]:
  """scripts/train.py flags for test_loop's micro config with NUM_STEPS, EVERY and KEEP:
  an override for each field that differs from configs/jbond_tiny.py."""
  path = ROOT / 'configs' / 'jbond_tiny.py'
  c = micro_config(NUM_STEPS)
  c.ckpt.every, c.ckpt.keep = EVERY, KEEP

  def flat(tree, prefix=''):
    if isinstance(tree, dict):
      return {k: v for key, sub in tree.items() for k, v in flat(sub, f'{prefix}{key}.').items()}
    return {prefix[:-1]: tree}

  base, micro = flat(config_lib.load_config_file(path).to_dict()), flat(c.to_dict())
  value = lambda v: f'({",".join(map(str, v))})' if isinstance(v, tuple) else str(v)
  return [f'--config={path}'] + [
    f'--config.{k}={value(v)}' for k, v in micro.items() if base[k] != v
  ]


FLAGS = _micro_flags()
ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
TIMING = ('tokens_per_s', 'step_time_s')  # wall-clock metrics, the only ones that may differ
_STARTED: list[subprocess.Popen] = []  # killed at the end if a failure left them running


# ---------------------------------------------------------------------------
# Helpers for subprocess runs.


@dataclasses.dataclass
class Done:
  rc: int
  out: str
  err: str


def _start(
  base: pathlib.Path,
  workdir: pathlib.Path,
  name: str,
  *extra: str,
  script: str = 'train',
  kill_at: int | None = None,
):
  """`scripts/{script}.py` in a subprocess; with `kill_at`, train.py through
  tests/run/sigkill_at_step.py, which SIGKILLs itself once it has logged that step."""
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=os.environ.get('JAX_COMPILATION_CACHE_DIR')
    or str(base / 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
  )
  args = FLAGS if script == 'train' else []
  runner = [str(ROOT / 'scripts' / f'{script}.py')]
  if kill_at is not None:
    runner = [str(ROOT / 'tests' / 'run' / 'sigkill_at_step.py'), str(kill_at), *runner[1:]]
  cmd = [sys.executable, *runner, *args, f'--workdir={workdir}']
  logs = [open(base / f'{name}.{kind}', 'w') for kind in ('out', 'err')]  # noqa: SIM115
  proc = subprocess.Popen([*cmd, *extra], cwd=ROOT, env=env, stdout=logs[0], stderr=logs[1])
  proc.logs = logs
  _STARTED.append(proc)
  return proc


def _finish(proc: subprocess.Popen, timeout: float = 400) -> Done:
  rc = proc.wait(timeout=timeout)
  for f in proc.logs:
    f.close()
  out, err = (pathlib.Path(f.name).read_text() for f in proc.logs)
  return Done(rc, out, err)


def _steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / 'metrics.jsonl'
  steps = []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      steps.append(json.loads(line)['step'])
    except ValueError:
      pass  # being written
  return steps


def _wait_for_step(proc: subprocess.Popen, workdir: pathlib.Path, step: int) -> None:
  deadline = time.time() + 400
  while proc.poll() is None and time.time() < deadline:
    if (_steps(workdir) or [0])[-1] >= step:
      return
    time.sleep(0.005)


def _checkpoints(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _truncate_latest(workdir: pathlib.Path) -> str:
  """Cut the latest checkpoint's largest data file in half; returns its relative path."""
  step_dir = workdir / 'checkpoints' / str(_checkpoints(workdir)[-1])
  data = max((p for p in step_dir.rglob('*') if p.parent.name == 'd'), key=os.path.getsize)
  os.truncate(data, data.stat().st_size // 2)
  return str(data.relative_to(step_dir))


def _orchestrate(base: pathlib.Path) -> dict:
  resumed, straight = base / 'resumed', base / 'straight'
  out: dict = {}
  # SIGTERM once two steps are logged. This launch compiles; once it has taken a step, the
  # uninterrupted run starts beside it and reads the compiled steps from the cache.
  proc = _start(base, resumed, 'term')
  _wait_for_step(proc, resumed, 1)
  straight_proc = _start(base, straight, 'straight')
  _wait_for_step(proc, resumed, 2)
  proc.send_signal(signal.SIGTERM)
  out['term'] = _finish(proc)
  out['term_steps'], out['term_checkpoints'] = _steps(resumed), _checkpoints(resumed)
  # The rerun, killed between two checkpoints.
  out['kill_target'] = random.Random(0).randint(EVERY + 1, 2 * EVERY - 1)
  out['kill'] = _finish(_start(base, resumed, 'kill', kill_at=out['kill_target']))
  out['kill_steps'], out['kill_checkpoints'] = _steps(resumed), _checkpoints(resumed)
  out['summary_after_kill'] = (resumed / 'summary.json').exists()
  out['straight'] = _finish(straight_proc)  # its evaluation is compiled (and cached) once
  # The rerun to the end; damaged latest checkpoints in training (with safe config
  # changes) and in evaluation.
  final = _start(base, resumed, 'final')
  for name in ('corrupt_train', 'corrupt_eval'):
    shutil.copytree(straight, base / name)
    out[f'{name}_file'] = _truncate_latest(base / name)
  train = _start(
    base, base / 'corrupt_train', 'corrupt_train', '--config.train.max_bad_steps=3',
    '--config.ckpt.keep=4',
  )  # fmt: skip
  evaluate = _start(base, base / 'corrupt_eval', 'corrupt_eval', script='evaluate')
  out['final'], out['corrupt_train'], out['corrupt_eval'] = map(_finish, (final, train, evaluate))
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The subprocess runs' results, started in the background when the module starts."""
  base = tmp_path_factory.mktemp('reliability')
  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(_orchestrate, base)
  yield base, future
  pool.shutdown(wait=True)
  for proc in _STARTED:
    if proc.poll() is None:
      proc.kill()


@pytest.fixture
def done(runs):
  base, future = runs
  return base, future.result()


def _rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for field in ('params', 'anchor_params', 'ref_params', 'opt_state', 'rng'):
    jax.tree.map(
      lambda x, y, f=field: np.testing.assert_array_equal(x, y, err_msg=f),
      getattr(a, field),
      getattr(b, field),
    )


def _assert_same_metrics(a: pathlib.Path, b: pathlib.Path):
  strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
  assert strip(_rows(a)) == strip(_rows(b)), 'a resumed run must log what an uninterrupted one does'


# ---------------------------------------------------------------------------
# In-process tests (they run while the subprocesses work).


def test_start_the_background_runs(runs):
  assert runs[1].running() or runs[1].done()


def _poisoned(build, poison_steps, fail_reference=False):
  """`run_setup.build` whose reward is NaN on the first prompt of each batch in
  `poison_steps` (keyed on the prompt, so the compiled step is the same every step), and
  whose pi_ref is a random one-layer model (no supervised pre-training to compile)."""

  def patched(c, mesh):
    setup = build(c, mesh)
    cfg = dataclasses.replace(setup.cfg, num_layers=1)  # half the layers: a faster compile
    probe = copy.deepcopy(setup.prompts)  # the batches the run will draw
    batches = [probe.next_batch()[0][0] for _ in range(c.train.num_steps)]
    poison_KxP = np.full((c.train.num_steps, batches[0].shape[0]), -1, np.int32)
    for k in poison_steps:
      poison_KxP[k - 1] = batches[k - 1]
    base = setup.step_cfg.reward_fn

    def reward(poison, prompt_BxP, valid_BxP, response_BxG, mask_BxG):
      r_B = base(None, prompt_BxP, valid_BxP, response_BxG, mask_BxG)
      hit_B = jnp.any(jnp.all(prompt_BxP[:, None, :] == poison[None], axis=-1), axis=-1)
      return jnp.where(hit_B, jnp.nan, r_B)

    def reference(shardings):
      assert not fail_reference, 'pi_ref was built: a start-up check came too late'
      init = jax.jit(model_lib.init_params, static_argnums=0)  # one compile, not one per op
      return jax.device_put(init(cfg, jax.random.PRNGKey(1)), shardings)

    return dataclasses.replace(
      setup,
      cfg=cfg,
      step_cfg=dataclasses.replace(setup.step_cfg, model=cfg, reward_fn=reward),
      reward_params=poison_KxP,
      reference=reference,
    )

  return patched


def test_nan_reward_skips_its_step_and_max_bad_steps_in_a_row_stop(tmp_path, monkeypatch):
  c = micro_config(8)
  c.train.max_bad_steps = 2
  c.ckpt.every, c.ckpt.keep = 1, 10
  monkeypatch.setattr(trainer.run_setup, 'build', _poisoned(BUILD, (3, 5, 6)))
  with pytest.raises(
    trainer.RunError,
    match=r'^steps 5-6 \(2 in a row\) had NaN or Inf values \(last: nonfinite_rewards.*\); each '
    r'was skipped, so the parameters are those of step 4; stopping '
    r'\(config\.train\.max_bad_steps=2\)\.$',
  ):
    trainer.run(c, tmp_path)

  assert not (tmp_path / 'summary.json').exists()
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert 'NaN' not in text and 'Infinity' not in text  # non-finite values are null
  rows = _rows(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 3 was skipped, the run went on
  assert [r['nonfinite_rewards'] for r in rows] == [0, 0, 1, 0, 1, 1]
  assert [r['skipped'] for r in rows] == [0, 0, 1, 0, 1, 1]
  assert [r['skipped_steps'] for r in rows] == [0, 0, 1, 1, 2, 3]

  ckpts = checkpoint.Checkpoints(tmp_path / 'checkpoints', 1, 10, read_only=True)
  abstract = checkpoint.with_sharding(
    run_setup.abstract_state(_poisoned(BUILD, ())(c, run_setup.make_mesh(c))),
    ONE_DEVICE,
  )
  states = {s: ckpts.load(s, abstract)[0] for s in ckpts.steps}  # `load` checks finiteness
  ckpts.close()
  assert sorted(states) == [1, 2, 3, 4, 5, 6]
  for before, after, changed in ((2, 3, False), (3, 4, True), (4, 6, False)):
    a, b = states[before], states[after]
    assert int(b.step) == after  # the counter advances on a skipped step ...
    assert not np.array_equal(a.rng, b.rng)  # ... and so does the RNG (a new batch and draw)
    for field in ('params', 'anchor_params', 'opt_state'):
      leaves = [jax.tree.leaves(getattr(state, field)) for state in (a, b)]
      same = all(np.array_equal(x, y) for x, y in zip(*leaves, strict=True))
      assert same != changed, (field, before, after)


def test_keep_if_is_a_select_of_whole_trees():
  new, old = {'w': jnp.array([1.0, jnp.nan]), 'b': None}, {'w': jnp.zeros(2), 'b': None}
  assert step_lib.keep_if(jnp.array(False), new, old)['w'].tolist() == [0.0, 0.0]
  assert np.isnan(step_lib.keep_if(jnp.array(True), new, old)['w'][1])


def test_max_bad_steps_must_be_a_positive_integer(tmp_path):
  for bad in (0, -1):
    c = micro_config(2)
    c.train.max_bad_steps = bad
    with pytest.raises(ConfigError, match=rf'^config\.train\.max_bad_steps={bad} is invalid'):
      trainer.run(c, tmp_path)


@pytest.mark.parametrize(
  ('reward_B', 'got'),
  [
    (lambda r_B: r_B[:, None], r'float32\[8, 1\]'),
    (lambda r_B: r_B.astype(jnp.int32), r'int32\[8\]'),
  ],
)
def test_a_reward_of_the_wrong_shape_or_dtype_stops_before_compiling(
  tmp_path, monkeypatch, reward_B, got
):
  def build(c, mesh):
    setup = _poisoned(BUILD, (), fail_reference=True)(c, mesh)
    base = setup.step_cfg.reward_fn
    wrong = lambda *args: reward_B(base(*args))
    return dataclasses.replace(setup, step_cfg=dataclasses.replace(setup.step_cfg, reward_fn=wrong))

  monkeypatch.setattr(trainer.run_setup, 'build', build)
  with pytest.raises(
    ConfigError,
    match=rf"^the reward \(the noisy_copy task's reward\) returns {got} for a batch of 8 "
    r'responses; it must return one float32 per response: float32\[8\]\.$',
  ):
    trainer.run(micro_config(2), tmp_path)


def test_an_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(trainer.RunError, match=r'^workdir .*a_file/run is not writable \(\w+Error'):
    trainer.run(micro_config(2), tmp_path / 'a_file' / 'run')


def test_an_unknown_config_field_is_one_line_with_a_suggestion(tmp_path):
  cmd = [sys.executable, 'scripts/train.py', *FLAGS, '--config.bond.etaa=0.1']
  proc = subprocess.run(
    [*cmd, f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: --config.bond.etaa: config.bond has no field 'etaa' (did you mean config.bond.eta?)"
  )
  assert 'Traceback' not in proc.stderr and not any(tmp_path.iterdir())


def _fake_checkpointed_workdir(workdir: pathlib.Path, c) -> None:
  """config.json of `c` and one (tiny) checkpoint: what a resume checks against."""
  guards.check_resume_config(workdir, c, None)
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', 2, 2)
  ckpts.save(2, {'w': jnp.ones(3)}, metadata={'data_position': {'index': 2}})
  ckpts.close()


def test_resuming_with_another_algorithm_or_shape_is_refused(tmp_path):
  _fake_checkpointed_workdir(tmp_path, micro_config(4))
  saved = (tmp_path / 'config.json').read_text()
  c = micro_config(4)
  c.bond.eta, c.train.batch_size, c.seed, c.sampling.max_new_tokens = 0.1, 16, 1, 6
  with pytest.raises(
    ConfigError,
    match=rf'^{tmp_path} holds checkpoints of a run with another config, which this one cannot '
    r'resume: bond\.eta 0\.02 -> 0\.1, sampling\.max_new_tokens 10 -> 6, seed 0 -> 1, '
    r'train\.batch_size 8 -> 16; use a new --workdir, or change only train\.num_steps, ',
  ):
    trainer.run(c, tmp_path)
  assert (tmp_path / 'config.json').read_text() == saved  # the previous run's, untouched
  assert not (tmp_path / 'config_changes.jsonl').exists()


def test_safe_config_changes_are_recorded(tmp_path):
  _fake_checkpointed_workdir(tmp_path, micro_config(4))
  c = micro_config(10)
  c.eval.num_prompts, c.log.progress, c.train.max_bad_steps = 16, True, 2
  guards.check_resume_config(tmp_path, c, 2)
  (record,) = [json.loads(x) for x in (tmp_path / 'config_changes.jsonl').read_text().splitlines()]
  assert record['resumed_from_checkpoint'] == 2
  assert record['changes'] == {
    'eval.num_prompts': {'old': 8, 'new': 16},
    'log.progress': {'old': False, 'new': True},
    'train.max_bad_steps': {'old': 5, 'new': 2},
    'train.num_steps': {'old': 4, 'new': 10},
  }
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 10


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  ckpts = checkpoint.Checkpoints(tmp_path, 2, keep=1)
  ckpts.save(2, {'w': jnp.arange(3.0)}, metadata={'data_position': {'index': 2}})

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(ckpts._ckpt, 'save', disk_full)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'^saving step 4 to .* failed \(OSError: \[Errno 28\] No space left on device\); '
    r'step 2 is intact$',
  ):
    ckpts.save(4, {'w': jnp.arange(3.0) + 4}, metadata={'data_position': {'index': 4}})
  monkeypatch.undo()
  with pytest.raises(checkpoint.CheckpointError, match=r'^refusing to save step 6: .*NaN'):
    ckpts.save(6, {'w': jnp.array([1.0, jnp.nan, 0.0])}, metadata={'data_position': {}})
  ckpts.close()

  again = checkpoint.Checkpoints(tmp_path, 2, keep=1)
  abstract = jax.eval_shape(lambda: {'w': jnp.zeros(3)})
  restored = again.restore_latest(checkpoint.with_sharding(abstract, ONE_DEVICE))
  assert restored.step == 2 and restored.state['w'].tolist() == [0.0, 1.0, 2.0]
  assert restored.metadata['data_position'] == {'index': 2}
  again.save(4, {'w': jnp.arange(3.0) + 4}, metadata={'data_position': {'index': 4}})
  assert again.steps == [4]  # keep=1 deletes step 2 only once step 4 is saved and listed
  again.close()


def test_a_flipped_byte_fails_the_crc_and_the_previous_checkpoint_is_used(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path / 'checkpoints', 1, keep=3)
  for step in (1, 2):
    ckpts.save(step, {'w': jnp.arange(256.0) + step}, metadata={'data_position': {'i': step}})
  ckpts.close()
  data = max((tmp_path / 'checkpoints' / '2').rglob('d/*'), key=os.path.getsize)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
  data.write_bytes(bytes(raw))

  abstract = checkpoint.with_sharding(jax.eval_shape(lambda: {'w': jnp.zeros(256)}), ONE_DEVICE)
  again = checkpoint.Checkpoints(tmp_path / 'checkpoints', 1, keep=3)
  restored = again.restore_latest(abstract, move_aside=True)
  assert restored.step == 1 and restored.state['w'][0] == 1.0
  ((step, why),) = restored.skipped
  assert step == 2 and re.fullmatch(r'state/(.*/)?d/\w+ fails its CRC32 check \(corrupted\)', why)
  assert again.steps == [1]  # step 2 moved aside, so training can save a new step 2
  assert [p.name.split('.')[0] for p in (tmp_path / 'checkpoints.skipped').iterdir()] == ['2']
  again.close()

  for path in (tmp_path / 'checkpoints' / '1').rglob('d/*'):
    os.truncate(path, 1)
  with pytest.raises(checkpoint.CheckpointError, match=r'^no usable checkpoint in .*step 1: '):
    checkpoint.Checkpoints(tmp_path / 'checkpoints', 1, keep=3).restore_latest(abstract)


def _events(path: pathlib.Path) -> list:
  """TensorBoard Event protos of an event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  data, events, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i : i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
    i += 12 + n + 4
  return events


def test_a_resumed_writer_cuts_the_logs_back_to_its_step(tmp_path):
  first = metrics.MetricWriter(tmp_path, 5, 0, tensorboard=True, progress=False)
  for step in range(1, 6):
    first.write(step, {'loss': step, 'bad': float('nan') if step == 2 else 0.0})
  first.close()
  with (tmp_path / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 6, "lo')  # a line torn by SIGKILL
  again = metrics.MetricWriter(tmp_path, 5, 3, tensorboard=True, progress=False)
  assert [r['step'] for r in _rows(tmp_path)] == [1, 2, 3]
  assert _rows(tmp_path)[1]['bad'] is None
  again.write(4, {'loss': 40.0})
  again.close()
  assert [(r['step'], r['loss']) for r in _rows(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 40)]
  # TensorBoard drops the earlier run's events from step 4 on (its purge mechanism).
  (resumed,) = (tmp_path / 'tensorboard').glob('*.from_step_3')
  assert [e.step for e in _events(resumed) if e.HasField('session_log')] == [4]


def test_weights_load_without_pickle_and_never_run_remote_code():
  pattern = re.compile(
    r'\bpickle\b|torch\.load|trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True|\bdill\b'
  )
  hits = [
    f'{path.relative_to(ROOT)}:{i}: {line.strip()}'
    for path in sorted((ROOT / 'bond_jax').rglob('*.py'))
    for i, line in enumerate(path.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert not hits, hits
  tokenizer = (ROOT / 'bond_jax' / 'data' / 'tokenizer.py').read_text()
  calls = re.findall(r'from_pretrained\((.*?)\)', tokenizer, re.S)
  assert calls and all('trust_remote_code=False' in call for call in calls), calls
  # The GGUF importer is the one other reader of Hugging Face files: local files only, no
  # remote code, every call through the same keyword set.
  importer = (ROOT / 'bond_jax' / 'models' / 'gguf_import.py').read_text()
  (kw,) = re.findall(r'^  kw = dict\((.*?)\)$', importer, re.M)
  assert 'trust_remote_code=False' in kw and 'local_files_only=True' in kw, kw
  calls = re.findall(r'from_pretrained\(((?:[^()]|\([^()]*\))*)\)', re.sub(r'`.*?`', '', importer))
  assert calls and all(call.rstrip().rstrip(',').endswith('**kw') for call in calls), calls
  for path in sorted((ROOT / 'bond_jax').rglob('*.py')):  # no other loader of HF models
    if path.name not in ('tokenizer.py', 'gguf_import.py'):
      assert 'from_pretrained(' not in re.sub(r'""".*?"""', '', path.read_text(), flags=re.S)


# ---------------------------------------------------------------------------
# The subprocess runs.


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_from_it(done):
  base, out = done
  term = out['term']
  assert term.rc == 128 + signal.SIGTERM, term.err[-2000:]
  last = term.err.strip().splitlines()[-1]
  m = re.fullmatch(
    r'stopped by SIGTERM after step (\d+), which is saved in (.*): rerun the same command to '
    r'resume\.',
    last,
  )
  assert m, last
  step = int(m.group(1))
  assert out['term_steps'] == list(range(1, step + 1))  # the last logged step ...
  assert out['term_checkpoints'][-1] == step  # ... is the saved one
  assert f'resumed from {base / "resumed" / "checkpoints"} at step {step}' in out['kill'].out


def test_sigkill_then_rerun_equals_an_uninterrupted_run(done):
  base, out = done
  assert out['kill'].rc == -signal.SIGKILL
  killed_at, saved = out['kill_steps'][-1], out['kill_checkpoints'][-1]
  assert killed_at == out['kill_target'] < NUM_STEPS  # it logged that step, and no later one
  assert saved < killed_at  # steps saved+1 .. killed_at were logged and lost
  assert f'at step {saved}' in out['final'].out
  assert not out['summary_after_kill']  # summary.json is written at the end only
  assert out['final'].rc == 0 and out['straight'].rc == 0, out['final'].err[-2000:]
  assert [r['step'] for r in _rows(base / 'resumed')] == list(range(1, NUM_STEPS + 1))
  _assert_same_metrics(base / 'resumed', base / 'straight')
  _assert_same_state(
    trainer.load_workdir(base / 'resumed')[2], trainer.load_workdir(base / 'straight')[2]
  )
  summary = lambda name: json.loads((base / name / 'summary.json').read_text())
  assert summary('resumed') == summary('straight')


def test_a_truncated_latest_checkpoint_is_skipped_in_training_and_evaluation(done):
  base, out = done
  file = re.escape(out['corrupt_train_file'])
  train, evaluate = out['corrupt_train'], out['corrupt_eval']
  assert train.rc == 0, train.err[-2000:]
  assert re.search(
    rf'warning: skipped checkpoint step {NUM_STEPS} \({file} is \d+ bytes, \d+ were written '
    rf'\(truncated or overwritten\)\); moved it to .*checkpoints\.skipped\n',
    train.out,
  ), train.out
  assert f'at step {2 * EVERY}' in train.out
  workdir = base / 'corrupt_train'
  assert [r['step'] for r in _rows(workdir)] == list(range(1, NUM_STEPS + 1))
  _assert_same_metrics(workdir, base / 'straight')
  _assert_same_state(trainer.load_workdir(workdir)[2], trainer.load_workdir(base / 'straight')[2])
  # The safe changes went through and are on record.
  (record,) = [json.loads(x) for x in (workdir / 'config_changes.jsonl').read_text().splitlines()]
  assert record['changes'] == {
    'ckpt.keep': {'old': KEEP, 'new': 4},
    'train.max_bad_steps': {'old': 5, 'new': 3},
  }

  assert evaluate.rc == 0, evaluate.err[-2000:]
  assert re.search(
    rf'warning: skipped checkpoint step {NUM_STEPS} \({file} is \d+ bytes.*\); using step '
    rf'{2 * EVERY}\n',
    evaluate.out,
  ), evaluate.out
  assert json.loads((base / 'corrupt_eval' / 'summary.json').read_text())['step'] == 2 * EVERY
