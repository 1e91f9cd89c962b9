"""The memory planner (bond_jax/run/memory_plan.py, scripts/memory_plan.py) on the tiny preset.

The independent truths: the tiny decoder's parameter count from its architecture (the
formula below), and XLA's own count of the compiled step's argument bytes per device. The
gpu:2 and TPU plans run the script in subprocesses (JAX fixes the CPU device count when it
starts), started at once so they compile beside the one-device plan of this process.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

from bond_jax.models import presets
from bond_jax.run import config as config_lib
from bond_jax.run import memory_plan, plan_report, plan_targets
from bond_jax.run.guards import RunError

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
# jbond_gemma2b.py (a Hugging Face run with a reward model of the policy's size, bfloat16)
# shrunk to the tiny preset: no checkpoint is read, only shapes.
TINY_HF = [
  '--config=configs/jbond_gemma2b.py',
  '--config.model.preset=tiny',
  '--config.data.max_prompt_len=8',
  '--config.sampling.max_new_tokens=4',
  '--config.train.batch_size=4',
]
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def tiny_parameter_count() -> int:
  """Gemma 1 layout: tied embedding, q/k/v/o, GeGLU (gate, up, down), two norms per layer
  and a final norm."""
  c = presets.preset('tiny')
  v, d, f, n, k, h = (
    c.vocab_size,
    c.embed_dim,
    c.hidden_dim,
    c.num_heads,
    c.num_kv_heads,
    c.head_dim,
  )
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
  return v * d + c.num_layers * per_layer + d


def _script(*args: str) -> subprocess.Popen:
  # The plans run beside this process, which may hold libtpu's lock once JAX has started;
  # they only compile, so loading libtpu more than once is harmless.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(
    [sys.executable, 'scripts/memory_plan.py', *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _last_json(out: str) -> dict:
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def background_plans():
  """The gpu:2 plan and (with libtpu) a v5e:2x2 plan of TINY_HF, running in subprocesses."""
  procs = {'gpu2': _script(*TINY_HF, '--target=gpu:2')}
  if HAS_LIBTPU:
    procs['tpu'] = _script(*TINY_HF, '--target=v5e:2x2')
  yield procs
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


@pytest.fixture(scope='module')
def one_device(background_plans):
  """jbond_tiny.py (float32 policy, anchor and pi_ref; programmatic reward) planned for
  gpu:1 in this process, with the compiled step kept for check_fits."""
  del background_plans  # started first, so that they compile while this one does
  c = config_lib.load_config_file(ROOT / 'configs' / 'jbond_tiny.py')
  c.train.batch_size = 4
  c.sampling.max_new_tokens = 4
  return memory_plan.plan(c, plan_targets.parse_target('gpu:1'))


def test_one_device_trees_equal_parameter_count(one_device):
  n = tiny_parameter_count()
  trees = one_device.trees
  assert trees['params'] == trees['anchor_params'] == trees['ref_params'] == 4 * n
  # Adam's mu and nu in float32, plus int32 step counters.
  assert 8 * n <= trees['opt_state'] <= 8 * n + 64
  assert 'reward_model' not in trees  # the embedded task's reward has no parameters
  assert one_device.mesh_shape == (1, 1, 1)
  # XLA's own count of what the step takes: exactly the trees (no padding on CPU).
  assert one_device.memory.arguments == sum(trees.values())
  assert one_device.memory.aliased > 0  # the donated state's new value reuses its buffers
  assert one_device.fits and one_device.peak < GIB


def test_script_json_on_two_fake_devices(background_plans):
  code, out, err = _finish(background_plans['gpu2'])
  assert code == 0, err[-3000:]
  summary = _last_json(out)
  for key in ('peak_gib_per_device', 'device_memory_gib', 'fits', 'target', 'mesh'):
    assert key in summary
  assert summary['target'] == 'gpu:2' and summary['fits'] is True
  assert summary['mesh'] == {'data': 1, 'fsdp': 2, 'model': 1}  # fsdp=-1 took both devices
  assert summary['device_memory_gib'] == pytest.approx(81_559 / 1024, abs=1e-3)  # H100 80 GB
  trees = summary['trees_bytes_per_device']
  n, d = tiny_parameter_count(), presets.preset('tiny').embed_dim
  # Each device holds between half and all of each tree (sharded over 2, or replicated).
  assert 4 * n / 2 <= trees['params'] <= 4 * n
  assert trees['params'] == trees['anchor_params']
  assert 2 * (n + d) / 2 <= trees['reward_model'] <= 2 * (n + d)  # bfloat16, plus the score head
  assert trees['prompts'] == 2 * 8 * (4 + 1)  # 2 of 4 rows, 8 tokens, int32 ids + bool mask
  xla = summary['xla_bytes_per_device']
  assert xla['arguments'] == sum(trees.values())
  assert summary['peak_bytes_per_device'] >= xla['arguments'] + xla['temporaries'] - xla['aliased']
  assert 'widens bfloat16' in out and 'calibration' in out
  assert summary['cpu_calibration_mib']['bf16_matmul_pair_temporaries'] > 256


@pytest.mark.skipif(
  not HAS_LIBTPU,
  reason='libtpu is not installed (optional: pip install -r requirements-tpu.txt); TPU '
  'targets compile with the TPU compiler',
)
def test_tpu_target_compiles(background_plans):
  code, out, err = _finish(background_plans['tpu'])
  assert code == 0, err[-3000:]
  summary = _last_json(out)
  assert summary['compiler'] == 'tpu' and summary['num_devices'] == 4
  assert summary['device_memory_gib'] == 16 and summary['fits'] is True
  n, d = tiny_parameter_count(), presets.preset('tiny').embed_dim
  assert 4 * n / 4 <= summary['trees_bytes_per_device']['params'] <= 4 * n
  assert 2 * (n + d) / 4 <= summary['trees_bytes_per_device']['reward_model'] <= 2 * (n + d)
  # The TPU pads small dimensions to its tiles: XLA counts at least what the shardings say.
  assert summary['xla_bytes_per_device']['arguments'] >= sum(
    summary['trees_bytes_per_device'].values()
  )


def test_bad_target_is_one_line():
  code, out, err = _finish(_script(*TINY_HF, '--target=v5e-8'), timeout=120)
  assert code != 0
  lines = err.strip().splitlines()
  assert lines[-1].startswith("error: --target='v5e-8' is invalid") and 'gpu:N' in lines[-1]
  assert 'Traceback' not in err


@pytest.mark.parametrize(
  'text, devices, gib',
  [('v5e:2x4', 8, 16), ('v5e:4x8', 32, 16), ('v5p:2x2x2', 8, 95), ('gpu:8', 8, 81_559 / 1024)],
)
def test_parse_target(text, devices, gib):
  target = plan_targets.parse_target(text)
  assert target.num_devices == devices
  assert target.device_memory_bytes / GIB == pytest.approx(gib)


@pytest.mark.parametrize('text', ['v5e-8', 'gpu:0', 'gpu', 'tpu:8', 'v9z:2x2', 'gpu:2:a100', ''])
def test_parse_target_rejects(text):
  with pytest.raises(plan_targets.TargetError, match='--target'):
    plan_targets.parse_target(text)


def test_gpu_memory_override():
  target = plan_targets.parse_target('gpu:2', gpu_memory_gib=141)
  assert target.device_memory_bytes == 141 * GIB
  assert plan_targets.parse_target('gpu:1:h200').device_memory_bytes == 143_771 * 2**20


def test_check_fits(one_device):
  compiled = one_device.compiled
  peak = one_device.peak
  assert memory_plan.check_fits(compiled, peak, 'CMD').peak == peak
  with pytest.raises(RunError) as e:
    memory_plan.check_fits(compiled, peak - 1, 'python scripts/memory_plan.py --target=gpu:1')
  message = str(e.value)
  assert '\n' not in message and 'will not fit' in message
  assert f'{peak / GIB:.2f} GiB per device' in message
  assert message.endswith('python scripts/memory_plan.py --target=gpu:1')


def test_hbm_oom_message():
  message = (
    'RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory '
    'required for HLO temporaries (22.00G) exceeds available HBM (15.75G). HLO module: jit_f.'
  )
  assert memory_plan.parse_hbm_oom(message) == (22 * GIB, int(15.75 * GIB))
  assert memory_plan.parse_hbm_oom('INTERNAL: something else') is None


def test_refused_plan_reports_what_the_compiler_needed():
  refused = memory_plan.Plan(
    target=plan_targets.parse_target('v5e:4x4'),
    mesh_shape=(1, 16, 1),
    trees={'params': GIB, 'opt_state': 2 * GIB},
    memory=None,
    lower_s=1.0,
    compile_s=2.0,
    host_peak_bytes=GIB,
    error='RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: ...',
    required=int(17.43 * GIB),
    compiler_limit=int(15.75 * GIB),
  )
  summary = refused.summary()
  assert summary['fits'] is False and summary['peak_gib_per_device'] == 17.43
  assert summary['device_memory_gib'] == 16 and 'CompileTimeHbmOom' in summary['error']
  text = '\n'.join(plan_report.describe(refused, 'configs/jbond_gemma7b.py'))
  assert 'DOES NOT FIT' in text and 'the compiler allows 15.75' in text


def test_local_target_of_a_tpu_slice():
  devices = [
    types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite', coords=(x, y, 0))
    for x in range(2)
    for y in range(4)
  ]
  assert plan_targets.local_target(devices) == 'v5e:2x4'
  gpus = [types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100')] * 8
  assert plan_targets.local_target(gpus) == 'gpu:8'


def test_fit_or_stop_is_a_no_op_on_cpu():
  step = jax.jit(lambda x: x + 1)
  assert memory_plan.fit_or_stop(step, jax.numpy.zeros(3)) is step
