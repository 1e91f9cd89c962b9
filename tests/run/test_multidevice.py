"""One device against eight: data-parallel and data x model sharded runs give the same
training curve and the same evaluation as a single-device run.

The sharded runs happen in the 8-device process (tests/eight_devices.py), the one-device
run is the session's micro run (tests/run/conftest.py): the same config and seed.
"""

import json

import numpy as np

from tests.run.test_loop import MICRO_STEPS


def test_sharded_runs_match_single_device(eight_devices, micro_run):
  assert 'runs' in eight_devices, eight_devices.get('error') or eight_devices['output'][-6000:]
  workdir, summary = micro_run
  one_rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for name in ('dp8', 'dp2_tp4'):
    other = eight_devices['runs'][name]
    assert len(other['rows']) == len(one_rows) == MICRO_STEPS
    for r1, r2 in zip(one_rows, other['rows'], strict=True):
      for k in ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss', 'grad_norm'):
        np.testing.assert_allclose(r2[k], r1[k], rtol=2e-3, atol=2e-4, err_msg=f'{name} {k}')
    for k in ('reward_ref', 'reward_policy', 'kl_policy_ref'):
      np.testing.assert_allclose(
        other['summary'][k], summary[k], rtol=2e-3, atol=2e-4, err_msg=f'{name} {k}'
      )
