"""One device against eight: data-parallel, fully sharded data-parallel and data x fsdp x
model sharded runs give the same training curve and the same evaluation as a single-device
run (all of them run in the background process, tests/eight_devices.py)."""

import numpy as np
import pytest

from tests.run.test_loop import MICRO_STEPS

SHARDED = ('dp8', 'fsdp8', 'dp2_fsdp2_tp2')  # (data, fsdp, model) = (8,1,1), (1,8,1), (2,2,2)


@pytest.mark.parametrize('name', SHARDED)
def test_sharded_run_matches_single_device(micro_runs, name):
  one, other = micro_runs['one'], micro_runs[name]
  assert len(other['rows']) == len(one['rows']) == MICRO_STEPS
  for r1, r2 in zip(one['rows'], other['rows'], strict=True):
    for k in ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss', 'grad_norm'):
      np.testing.assert_allclose(r2[k], r1[k], rtol=2e-3, atol=2e-4, err_msg=f'{name} {k}')
  for k in ('reward_ref', 'reward_policy', 'kl_policy_ref'):
    np.testing.assert_allclose(
      other['summary'][k], one['summary'][k], rtol=2e-3, atol=2e-4, err_msg=f'{name} {k}'
    )
