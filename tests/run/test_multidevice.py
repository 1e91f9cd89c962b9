"""One device against eight: data-parallel and data x model sharded runs give the same
training curve and the same evaluation as a single-device run."""

import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_sharded_runs_match_single_device(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(ROOT / 'tests' / 'run' / 'multidevice_checks.py'), str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  one = results['one']
  for name in ('dp8', 'dp2_tp4'):
    other = results[name]
    assert len(other['rows']) == len(one['rows']) == 3
    for r1, r2 in zip(one['rows'], other['rows'], strict=True):
      for k in ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss', 'grad_norm'):
        np.testing.assert_allclose(r2[k], r1[k], rtol=2e-3, atol=2e-4, err_msg=f'{name} {k}')
    for k in ('reward_ref', 'reward_policy', 'kl_policy_ref'):
      np.testing.assert_allclose(
        other['summary'][k], one['summary'][k], rtol=2e-3, atol=2e-4, err_msg=f'{name} {k}'
      )
