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
import threading
import time
from pathlib import Path

import jax
import pytest

from bond_jax.data import tasks
from bond_jax.models import decoder as model_lib
from bond_jax.models import presets

ROOT = Path(__file__).resolve().parents[1]
# The suite's programs are tiny and compiling them is most of its time, so the suite asks
# XLA's CPU compiler for less work: LLVM at optimization level 0 rather than 2, without its
# expensive passes, and fusions emitted by the older elemental emitter rather than the
# MLIR fusion emitters. XLA's own HLO passes are unchanged (so each program's fusions and
# memory are too); values differ by float rounding only (reductions add in another order,
# and one value computed in two fusions can round apart: see test_jbond's periodic anchor).
# Set before JAX makes its CPU client; the subprocesses the tests start are given it too.
# Measured in docs/BENCHMARKS.md.
TEST_XLA_FLAGS = ' '.join([
  '--xla_backend_optimization_level=0',
  '--xla_llvm_disable_expensive_passes=true',
  '--xla_cpu_use_fusion_emitters=false',
])  # fmt: skip
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'.strip()
# The scripts the tests start import this checkout's bond_jax, whether or not it is installed.
if str(ROOT) not in os.environ.get('PYTHONPATH', '').split(os.pathsep):
  os.environ['PYTHONPATH'] = os.pathsep.join(
    filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])
  )
_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_cache_dir: str | None = None  # made by this process (not inherited): removed at its end
_SESSION_ENV = 'BOND_JAX_TEST_SESSION_DIR'  # the background parts' directories
_session_dir: str | None = None  # likewise


def pytest_configure(config):
  """Point JAX's persistent compilation cache at a fresh directory for this session, every
  compilation included (the defaults skip programs that compile in under a second), and
  make the session's directory for the background parts. A pytest-xdist worker uses the
  directories its controller made."""
  global _cache_dir, _session_dir
  if not hasattr(config, 'workerinput') or not os.environ.get(_CACHE_ENV):
    _cache_dir = tempfile.mkdtemp(prefix='bond_jax_jax_cache_')
    os.environ[_CACHE_ENV] = _cache_dir
  if not hasattr(config, 'workerinput') or not os.environ.get(_SESSION_ENV):
    _session_dir = tempfile.mkdtemp(prefix='bond_jax_test_session_')
    os.environ[_SESSION_ENV] = _session_dir
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_ENV])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


@pytest.fixture(scope='session')
def tiny_cfg() -> model_lib.ModelConfig:
  return presets.preset(
    'tiny', num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=2, head_dim=8
  )


@pytest.fixture(scope='session')
def tiny_params(tiny_cfg):
  return model_lib.init_params(tiny_cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope='session')
def copy_task(tiny_cfg) -> tasks.NoisyCopy:
  return tasks.NoisyCopy(vocab_size=tiny_cfg.vocab_size, prompt_len=4, keep_prob=0.5)


class Background:
  """One part of tests/eight_devices.py in a subprocess, started once per session, read
  once finished. Its directory is fixed by the session (BOND_JAX_TEST_SESSION_DIR), so that
  the pytest-xdist workers read what their controller started; whichever process makes the
  directory starts the part (and stops it at its end), the others wait for its
  `returncode` file."""

  def __init__(self, part: str):
    self.part = part
    self.proc: subprocess.Popen | None = None

  @property
  def dir(self) -> Path:
    return Path(os.environ[_SESSION_ENV]) / self.part

  def start(self) -> None:
    try:
      self.dir.mkdir()
    except FileExistsError:
      return  # started by this or another process of the session
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
    proc, done = self.proc, self.dir / 'returncode'
    threading.Thread(target=lambda: done.write_text(str(proc.wait())), daemon=True).start()

  def results(self, timeout: float = 900) -> dict:
    """results.json (see tests/eight_devices.py) plus 'returncode' and 'output' (its log)."""
    self.start()
    done, deadline = self.dir / 'returncode', time.time() + timeout
    while not done.is_file():
      if time.time() > deadline:
        raise TimeoutError(f'tests/eight_devices.py {self.part} ran past {timeout} s')
      time.sleep(0.5)
    path = self.dir / 'results.json'
    results = json.loads(path.read_text()) if path.is_file() else {}
    output = (self.dir / 'output.txt').read_text()
    return {**results, 'returncode': int(done.read_text()), 'output': output}

  def stop(self) -> None:
    if self.proc is None:
      return
    if self.proc.poll() is None:  # a session that ended early (-x, Ctrl-C)
      self.proc.kill()
      self.proc.wait()
    self.log.close()


# fixture name -> its background process
_BACKGROUND = {'eight_device_sharding': Background('sharding'), 'micro_runs': Background('runs')}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """For pytest-xdist's --dist loadgroup: each test file is one group, run by one worker (its
  module fixtures are made once). A file that reads a background part says so in its
  group's name ('path|micro_runs'), for the controller to start that part."""
  if not getattr(config.option, 'loadgroup', False):
    return  # pytest-xdist's workers collect, and it sets this there for --dist loadgroup
  parts = {}
  for item in items:
    path = item.nodeid.split('::')[0]
    used = [name for name in _BACKGROUND if name in getattr(item, 'fixturenames', ())]
    parts.setdefault(path, set()).update(used)
  for item in items:
    path = item.nodeid.split('::')[0]
    item.add_marker(pytest.mark.xdist_group('|'.join([path, *sorted(parts[path])])))


def pytest_collection_finish(session):
  """Start the background processes that collected tests need now, so that they run beside
  the tests instead of after them."""
  if session.config.option.collectonly or hasattr(session.config, 'workerinput'):
    return  # nothing will run, or a pytest-xdist worker (see the hook below)
  needed = {name for item in session.items for name in getattr(item, 'fixturenames', ())}
  for name, background in _BACKGROUND.items():
    if name in needed:
      background.start()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
  """The pytest-xdist controller, once a worker has collected: start the background parts
  that a test's group names (see pytest_collection_modifyitems)."""
  for name, background in _BACKGROUND.items():
    if any(f'|{name}' in i.rpartition('@')[2] for i in ids):
      background.start()


def pytest_unconfigure(config):
  for background in _BACKGROUND.values():
    background.stop()
  for made in (_cache_dir, _session_dir):
    if made is not None:
      shutil.rmtree(made, ignore_errors=True)


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
