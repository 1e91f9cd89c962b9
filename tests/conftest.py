"""Shared fixtures: a tiny decoder with random weights, the embedded task, and the results
of the background processes with 8 fake CPU devices (tests/eight_devices.py).

The session compiles through one persistent compilation cache in a fresh temporary directory
(removed at the end; nothing is read from an earlier session). The `python` subprocesses the
tests start inherit it through JAX_COMPILATION_CACHE_DIR: a one-device `scripts/train.py`
of the micro config reads the programs this process compiled instead of compiling them
again (tests/run/test_reliability.py), and so does a program compiled again in this process
under a new `jax.jit` object. Subprocesses with another device count share nothing with
this process (the device topology is part of the cache key).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from bond_jax.data import tasks
from bond_jax.models import decoder as model_lib

ROOT = Path(__file__).resolve().parents[1]
# The suite's programs are tiny and compiling them is most of its time: LLVM at optimization
# level 1 rather than XLA's default 2 compiles them faster (XLA's own passes, so each
# program's fusions and memory, are unchanged; values differ by float rounding only). Set
# before JAX makes its CPU client; the subprocesses the tests start are given it too.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'.strip()
_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_cache_dir: str | None = None  # made by this process (not inherited): removed at its end


def pytest_configure(config):
  """Point JAX's persistent compilation cache at a fresh directory for this session, every
  compilation included (the defaults skip programs that compile in under a second). A
  pytest-xdist worker uses the directory its controller made."""
  global _cache_dir
  if not hasattr(config, 'workerinput') or not os.environ.get(_CACHE_ENV):
    _cache_dir = tempfile.mkdtemp(prefix='bond_jax_jax_cache_')
    os.environ[_CACHE_ENV] = _cache_dir
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_ENV])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


@pytest.fixture(scope='session')
def tiny_cfg() -> model_lib.ModelConfig:
  return model_lib.preset(
    'tiny', num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=2, head_dim=8
  )


@pytest.fixture(scope='session')
def tiny_params(tiny_cfg):
  return model_lib.init_params(tiny_cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope='session')
def copy_task(tiny_cfg) -> tasks.NoisyCopy:
  return tasks.NoisyCopy(vocab_size=tiny_cfg.vocab_size, prompt_len=4, keep_prob=0.5)


class Background:
  """One part of tests/eight_devices.py in a subprocess, started once, read once finished."""

  def __init__(self, part: str):
    self.part = part
    self.proc: subprocess.Popen | None = None

  def start(self) -> None:
    if self.proc is not None:
      return
    self.dir = Path(tempfile.mkdtemp(prefix=f'bond_jax_{self.part}_'))
    env = {
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    }
    env['XLA_FLAGS'] = TEST_XLA_FLAGS  # not the parent's device count: the script sets it
    self.log = open(self.dir / 'output.txt', 'w')  # noqa: SIM115 (closed in stop)
    self.proc = subprocess.Popen(
      [sys.executable, str(ROOT / 'tests' / 'eight_devices.py'), self.part, str(self.dir)],
      cwd=ROOT,
      env=env,
      stdout=self.log,
      stderr=subprocess.STDOUT,
    )

  def results(self, timeout: float = 900) -> dict:
    """results.json (see tests/eight_devices.py) plus 'returncode' and 'output' (its log)."""
    self.start()
    returncode = self.proc.wait(timeout=timeout)
    path = self.dir / 'results.json'
    results = json.loads(path.read_text()) if path.is_file() else {}
    return {**results, 'returncode': returncode, 'output': (self.dir / 'output.txt').read_text()}

  def stop(self) -> None:
    if self.proc is None:
      return
    if self.proc.poll() is None:  # a session that ended early (-x, Ctrl-C)
      self.proc.kill()
      self.proc.wait()
    self.log.close()
    shutil.rmtree(self.dir, ignore_errors=True)


# fixture name -> its background process
_BACKGROUND = {'eight_device_sharding': Background('sharding'), 'micro_runs': Background('runs')}


def pytest_collection_finish(session):
  """Start the background processes that collected tests need now, so that they run beside
  the main process instead of after it."""
  if session.config.option.collectonly or hasattr(session.config, 'workerinput'):
    return  # nothing will run, or a pytest-xdist worker: its fixtures start what it needs
  needed = {name for item in session.items for name in getattr(item, 'fixturenames', ())}
  for name, background in _BACKGROUND.items():
    if name in needed:
      background.start()


def pytest_unconfigure(config):
  for background in _BACKGROUND.values():
    background.stop()
  if _cache_dir is not None:
    shutil.rmtree(_cache_dir, ignore_errors=True)


@pytest.fixture(scope='session')
def eight_device_sharding() -> dict:
  """tests/models/sharding_8dev_checks.py run on 8 fake devices: {'exit_code', 'output'}."""
  return _BACKGROUND['eight_device_sharding'].results()


@pytest.fixture(scope='session')
def micro_runs() -> dict:
  """The micro runs of tests/eight_devices.py `runs`, finished; their workdirs are read-only
  for the tests."""
  results = _BACKGROUND['micro_runs'].results()
  if 'one' not in results:
    pytest.fail(f'the micro runs failed:\n{results.get("error") or results["output"][-6000:]}')
  return results
