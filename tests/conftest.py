"""Shared fixtures: a tiny decoder with random weights, the embedded task, and the results
of the background processes with 8 fake CPU devices (tests/eight_devices.py)."""

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
    env.pop('XLA_FLAGS', None)  # the script sets its own device count
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
