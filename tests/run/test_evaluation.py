"""Evaluation of any checkpoint: a middle step, the anchor, every kept step, and a
checkpoint written on one device read back onto a 4-device mesh in a fresh process."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bond_jax.run import evaluation
from bond_jax.run import loop as trainer
from bond_jax.types import ConfigError
from tests.conftest import TEST_XLA_FLAGS
from tests.run.test_loop import micro_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = ('reward_ref', 'reward_policy', 'kl_policy_ref', 'log_quantile', 'win_rate', 'kl_bwd')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, micro_runs):
  """A one-device micro J-BOND run with checkpoints at steps 2 and 4: a copy of the one the
  background process trained (tests/eight_devices.py), as the tests write eval/ into it."""
  one = pathlib.Path(micro_runs['one']['workdir'])
  c = micro_config(4)
  c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 1, 1  # one device of the 8 there
  assert json.loads((one / 'config.json').read_text()) == json.loads(c.to_json())
  return shutil.copytree(one, tmp_path_factory.mktemp('evaluation') / 'run')


def test_a_middle_step_and_the_anchor_can_be_chosen(workdir):
  (policy2,) = evaluation.evaluate_workdir(workdir, step=2)
  (anchor2,) = evaluation.evaluate_workdir(workdir, step=2, which='anchor')
  (policy4,) = evaluation.evaluate_workdir(workdir, step=4)
  assert (policy2['step'], anchor2['step'], policy4['step']) == (2, 2, 4)
  assert anchor2['which'] == 'anchor' and (workdir / 'eval' / 'step_2_anchor.json').is_file()
  # pi_ref's rows come from the same samples whatever is evaluated; the models differ.
  assert policy2['reward_ref'] == anchor2['reward_ref'] == policy4['reward_ref']
  assert policy2['kl_policy_ref'] != anchor2['kl_policy_ref'] != policy4['kl_policy_ref']
  # The EMA anchor (eta = 0.02) has barely left pi_ref after 2 steps; the policy has.
  assert abs(anchor2['kl_policy_ref']) < abs(policy2['kl_policy_ref'])
  # The default evaluation is the run's own final table.
  (latest,) = evaluation.evaluate_workdir(workdir)
  summary = json.loads((workdir / 'summary.json').read_text())
  for key in KEYS:
    np.testing.assert_allclose(latest[key], summary[key], rtol=1e-6, err_msg=key)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 3 .*kept steps: \[2, 4\]'):
    evaluation.evaluate_workdir(workdir, step=3)


def test_all_steps_into_one_jsonl(workdir):
  results = evaluation.evaluate_workdir(workdir, all_steps=True, num_prompts=4)
  lines = (workdir / 'eval' / 'all_steps_policy.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [r['step'] for r in results] == [2, 4]
  assert all(r['num_prompts'] == 4 for r in results)


def test_anchor_of_a_run_without_one_is_refused(tmp_path):
  c = micro_config(2)
  c.bond.anchor = 'fixed'
  trainer.run(c, tmp_path)
  with pytest.raises(ConfigError, match='--which=anchor: this run keeps no anchor copy'):
    evaluation.evaluate_workdir(tmp_path, which='anchor')


def test_one_device_checkpoint_evaluated_on_four_devices(workdir):
  (one,) = evaluation.evaluate_workdir(workdir, step=2, which='anchor')
  env = {**os.environ, 'XLA_FLAGS': f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4'}
  proc = subprocess.run(
    [sys.executable, 'scripts/evaluate.py', f'--workdir={workdir}', '--step=2', '--which=anchor',
     '--mesh.data=4', '--mesh.fsdp=1', '--mesh.model=1'],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = json.loads((workdir / 'eval' / 'step_2_anchor.json').read_text())
  assert four['mesh'] == [4, 1, 1] and one['mesh'] == [1, 1, 1]
  for key in KEYS:
    np.testing.assert_allclose(four[key], one[key], rtol=2e-3, atol=2e-4, err_msg=key)
