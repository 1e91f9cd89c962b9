"""Sharding policy. The 8-device checks run in a subprocess (see sharding_8dev_checks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
from jax.sharding import PartitionSpec as P

from bond_jax.models import decoder as model
from bond_jax.models import sharding

ROOT = Path(__file__).resolve().parents[2]


def test_on_eight_fake_devices():
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
  }
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-q',
      '-p',
      'no:cacheprovider',
      str(ROOT / 'tests' / 'models' / 'sharding_8dev_checks.py'),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_single_device_mesh_replicates_nothing_to_check():
  mesh = sharding.make_mesh(data=1, model=1)
  params = jax.eval_shape(lambda: model.init_params(model.TINY, jax.random.key(0)))
  specs = jax.tree_util.tree_leaves(sharding.param_shardings(params, mesh))
  assert specs[0].spec == P('model', None)  # divisible by 1: the rule still applies
  sharding.assert_big_tensors_sharded(params, mesh, min_size=1)  # model axis 1: no-op
