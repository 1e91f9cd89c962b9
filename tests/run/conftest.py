"""The micro run of test_loop.py, trained once per session on one device and shared by the
tests that read a finished run (test_loop.py, test_multidevice.py)."""

import pytest

from bond_jax.run import loop as trainer
from tests.run.test_loop import MICRO_STEPS, micro_config


@pytest.fixture(scope='session')
def micro_run(tmp_path_factory):
  """(workdir, summary) of micro_config(MICRO_STEPS). Tests read the workdir, never write it."""
  workdir = tmp_path_factory.mktemp('micro_run') / 'workdir'
  return workdir, trainer.run(micro_config(MICRO_STEPS), workdir)
