"""GPU targets planned with the TPU compiler as a stand-in (`--gpu_compiler=tpu`).

The TPU compile needs libtpu (requirements-tpu.txt) and is skipped without it; the
target parsing is checked everywhere.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import presets
from bond_jax.run import plan_targets

ROOT = Path(__file__).resolve().parents[2]
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.mark.parametrize('n, topology', [(1, 'v5p:1x1x1'), (8, 'v5p:2x2x2'), (32, 'v5p:2x4x4')])
def test_a_gpu_target_compiled_by_the_tpu_compiler(n, topology):
  target = plan_targets.parse_target(f'gpu:{n}', gpu_compiler='tpu')
  assert (target.kind, target.compile_with, target.num_devices) == ('gpu', 'tpu', n)
  assert target.device_memory_bytes == plan_targets.GPU_MEMORY_MIB['h100'] * 2**20
  assert plan_targets.stand_in_topology(n) == topology and topology in target.compiler
  assert plan_targets.parse_target(f'gpu:{n}').compile_with == 'cpu'


@pytest.mark.parametrize(
  'text, compiler, match',
  [
    ('gpu:3', 'tpu', '--gpu_compiler=tpu plans 1, 2, 4'),
    ('v5e:2x4', 'tpu', '--gpu_compiler applies to gpu:N targets'),
    ('gpu:1', 'cuda', "--gpu_compiler='cuda' is invalid"),
  ],
)
def test_bad_gpu_compiler_requests_are_one_line(text, compiler, match):
  with pytest.raises(plan_targets.TargetError, match=match):
    plan_targets.parse_target(text, gpu_compiler=compiler)


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (requirements-tpu.txt)')
def test_tiny_step_planned_for_one_gpu_by_the_tpu_compiler():
  # A process that has started JAX holds libtpu's lock (this one may have); the planner
  # only compiles, so a second load is harmless.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  env.pop('XLA_FLAGS', None)
  done = subprocess.run(
    [
      sys.executable,
      'scripts/memory_plan.py',
      '--config=configs/jbond_tiny.py',
      '--target=gpu:1',
      '--gpu_compiler=tpu',
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
  assert 'a stand-in for XLA' in done.stdout and 'not a GPU measurement' in done.stdout
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['compiler'] == 'tpu' and summary['num_devices'] == 1
  assert summary['device_memory_gib'] == pytest.approx(81_559 / 1024, abs=1e-3)  # 3 decimals
  assert 'cpu_calibration_mib' not in summary
  # jbond_tiny keeps policy, anchor and pi_ref in float32 on the one device: each tree is
  # exactly the preset's parameter count in 4-byte words, whatever the compiler.
  cfg = presets.preset('tiny')
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  trees = summary['trees_bytes_per_device']
  assert trees['params'] == trees['anchor_params'] == trees['ref_params'] == 4 * n
