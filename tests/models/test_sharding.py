"""Sharding policy. The 8-device checks (sharding_8dev_checks.py) run in a background process
(tests/eight_devices.py)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from bond_jax.models import decoder as model
from bond_jax.models import sharding


def test_on_eight_fake_devices(eight_device_sharding):
  assert eight_device_sharding.get('exit_code') == 0, eight_device_sharding['output'][-9000:]


def test_single_device_mesh_replicates_nothing_to_check():
  mesh = sharding.make_mesh(data=1, model=1)
  params = jax.eval_shape(lambda: model.init_params(model.TINY, jax.random.key(0)))
  specs = jax.tree_util.tree_leaves(sharding.param_shardings(params, mesh))
  assert specs[0].spec == P('model', None)  # divisible by 1: the rule still applies
  sharding.assert_big_tensors_sharded(params, mesh, min_size=1)  # model axis 1: no-op
