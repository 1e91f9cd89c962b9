"""GPU targets compiled by XLA's GPU compiler (`--gpu_compiler=gpu`), deviceless.

JAX's CUDA plugin (requirements-gpu.txt) compiles for described GPUs on a machine with
none; the compile is skipped where the plugin is not installed, the description and the
errors are checked everywhere.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import presets
from bond_jax.run import plan_targets

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA_PLUGIN = plan_targets.has_cuda_plugin()


def _field(text: str, name: str) -> str:
  found = re.findall(rf'^\s*{name}: (\S+)$', text, re.M)
  assert len(found) == 1, (name, text)
  return found[0]


@pytest.mark.parametrize(
  'text, gib, chip, kind',
  [
    ('gpu:1', None, 'h100', 'NVIDIA H100 80GB HBM3'),
    ('gpu:8:h200', None, 'h200', 'NVIDIA H200'),
    ('gpu:2', 40.0, 'h100', 'NVIDIA H100 80GB HBM3'),
  ],
)
def test_the_described_gpu_is_the_targets(text, gib, chip, kind):
  target = plan_targets.parse_target(text, gib, gpu_compiler='gpu')
  assert (target.compile_with, target.gpu_model) == ('gpu', chip)
  config = plan_targets.gpu_target_config(target)
  # The compiler plans against the target's memory, not a GPU's default.
  assert int(_field(config, 'device_memory_size')) == target.device_memory_bytes
  if gib is not None:
    assert target.device_memory_bytes == int(gib * 2**30)
  assert int(_field(config, 'memory_bandwidth')) == int(plan_targets.GPU_CHIPS[chip]['bandwidth'])
  assert f'device_description_str: "{kind}"' in config
  assert 'cuda_compute_capability { major: 9 minor: 0 }' in config
  assert 'described (deviceless' in target.compiler


def test_gpu_counts_the_compiler_cannot_lay_out_are_one_line():
  target = plan_targets.parse_target('gpu:12', gpu_compiler='gpu')
  with pytest.raises(plan_targets.TargetError, match='a multiple of 8'):
    plan_targets.described_gpus(target)


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is installed")
def test_without_the_cuda_plugin_the_error_names_the_requirements_file():
  target = plan_targets.parse_target('gpu:2', gpu_compiler='gpu')
  with pytest.raises(plan_targets.TargetError, match='requirements-gpu.txt'):
    plan_targets.target_devices(target)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed")
def test_described_gpus_come_in_the_targets_number():
  # In a fresh process kept to the CPU, as scripts/memory_plan.py runs: the plugin
  # registers itself on a GPU-less machine only then.
  code = (
    'from bond_jax.run import memory_plan as m\n'
    'for n in (2, 16):\n'
    "  d = m.target_devices(m.parse_target(f'gpu:{n}', gpu_compiler='gpu'))\n"
    '  print(len(d), sorted({x.device_kind for x in d}))\n'
  )
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  done = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  kind = "['NVIDIA H100 80GB HBM3']"
  assert done.stdout.split('\n')[:2] == [f'2 {kind}', f'16 {kind}']


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed")
def test_tiny_step_planned_for_two_gpus_by_the_gpu_compiler():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  done = subprocess.run(
    [
      sys.executable,
      'scripts/memory_plan.py',
      '--config=configs/jbond_tiny.py',
      '--target=gpu:2',  # --gpu_compiler=auto picks the GPU compiler where the plugin is
      '--config.train.batch_size=4',
      '--config.sampling.max_new_tokens=4',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'deviceless' in done.stdout
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['compiler'] == 'gpu' and summary['num_devices'] == 2
  assert 'cpu_calibration_mib' not in summary
  cfg = presets.preset('tiny')
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  trees = summary['trees_bytes_per_device']
  assert summary['mesh'] == {'data': 1, 'fsdp': 2, 'model': 1}
  assert trees['params'] == trees['anchor_params'] == trees['ref_params']
  # jbond_tiny's mesh puts both devices on 'fsdp': the large tensors are halved, the
  # norm scales kept whole, so each device holds a little over half of each tree.
  assert 4 * n // 2 < trees['params'] < 0.51 * 4 * n
  assert summary['xla_bytes_per_device']['temporaries'] > 0
