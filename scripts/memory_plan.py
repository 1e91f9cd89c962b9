"""Plan a run's memory per device before using any hardware. Usage:

  python scripts/memory_plan.py --config=configs/jbond_gemma2b.py --target=v5e:2x4
  python scripts/memory_plan.py --config=configs/jbond_gemma7b.py --target=gpu:8 \\
    --config.train.batch_size=64

It compiles the configured train step (the reward model included) from shapes only: the
model.preset's, or those in the config.json of model.hf_checkpoint / reward.checkpoint
when set; no weights are read. It prints what each device holds (each state tree, the
reward model, XLA's arguments, outputs, temporaries and the peak) against the target's
memory; the last line is one JSON object ("peak_gib_per_device", "fits", ...).

Targets: a TPU topology (v5e:2x4 = v5e-8, v5e:4x4, v5e:4x8, v5p:2x2x2, ...), compiled by
the TPU compiler (pip install -r requirements-tpu.txt; no TPU needed; its warnings about
TPU hosts are harmless), or gpu:N / gpu:N:h200, compiled for N fake CPU devices
(--gpu_memory_gib for another GPU). Exit status 0 whether or not it fits.
"""

import json
import os
import re
import sys

# Plans compile for described devices and never touch this machine's accelerator, except
# --gpu_compiler=gpu on a machine with NVIDIA GPUs, which uses them when they are of the
# target's kind. (JAX's CUDA plugin registers itself on a GPU-less machine only when JAX
# is kept to the CPU, so that is also what lets it compile deviceless there.)
_LOCAL_GPUS = os.path.exists('/dev/nvidia0') or os.path.exists('/dev/nvidiactl')
if not (_LOCAL_GPUS and re.search(r'--gpu_compiler[= ]gpu\b', ' '.join(sys.argv[1:]))):
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Plans only compile: libtpu may be loaded by several at once (no lock between them).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import app, flags, logging  # noqa: E402 (after the environment is set)
from ml_collections import config_flags  # noqa: E402 (after the environment is set)

from bond_jax.run import config as config_lib  # noqa: E402 (after the environment is set)
from bond_jax.run import memory_plan, plan_report, plan_targets  # noqa: E402 (as above)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_TARGET = flags.DEFINE_string('target', None, f'What to plan for: {plan_targets.TARGET_FORMS}.')
_GPU_MEMORY = flags.DEFINE_float(
  'gpu_memory_gib', None, 'Memory per GPU in GiB for gpu:N targets (default: the H100 80 GB).'
)
_GPU_COMPILER = flags.DEFINE_enum(
  'gpu_compiler',
  'auto',
  ['auto', 'cpu', 'tpu', 'gpu'],
  "How gpu:N targets are compiled: 'gpu' (XLA's GPU compiler, the GPU's own figure: on "
  "local GPUs of the target's kind, else deviceless; needs JAX's CUDA plugin, "
  "requirements-gpu.txt, no GPU), 'cpu' (N fake CPU devices; bfloat16 widened to float32, "
  "so temporaries are overstated) or 'tpu' (the TPU compiler for N v5p chips as a stand-in; "
  "requirements-tpu.txt). 'auto': 'gpu' where the CUDA plugin is installed, else 'cpu'.",
)
flags.mark_flags_as_required(['config', 'target'])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line (not a traceback) for a bad flag or override."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (ml_collections raises KeyError, AttributeError, ...)
    message = None
    files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    try:
      file, _, arg = files[-1].partition(':') if files else ('', '', '')
      c = config_lib.load_config_file(file, arg or None) if file else None
      for a in argv:
        m = re.match(r'--config\.([\w.]+)', a)
        problem = m and c is not None and config_lib.unknown_field(c, m.group(1))
        if problem:
          message = f'--config.{m.group(1)}: {problem}'
          break
    except Exception:  # noqa: BLE001 (the config file itself is broken: say the first error)
      pass
    sys.exit(f'error: {message or str(e).strip().splitlines()[0]}')


def _config_label(argv: list[str]) -> tuple[str, list[str]]:
  files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  overrides = [a for a in argv if a.startswith('--config.')]
  return (files[-1] if files else '?'), overrides


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    compiler = _GPU_COMPILER.value
    if compiler == 'auto':
      compiler = 'gpu' if plan_targets.has_cuda_plugin() else 'cpu'
      if not _TARGET.value.lower().startswith('gpu:'):
        compiler = 'cpu'
    target = plan_targets.parse_target(_TARGET.value, _GPU_MEMORY.value, compiler)
    if target.kind == 'gpu' and target.compile_with == 'cpu':
      import jax  # noqa: PLC0415 (the device count is set before JAX's backend starts)

      jax.config.update('jax_num_cpu_devices', target.num_devices)
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use
  except OSError as e:
    sys.exit(f'error: --config: {str(e).strip().splitlines()[-1].strip()}')
  except plan_targets.TargetError as e:
    sys.exit(f'error: {e}')
  config_file, overrides = _config_label(sys.argv)
  label = ' '.join([config_file, *overrides])
  print(f'planning {label} on {target.name} with {target.compiler} ...', flush=True)
  try:
    result = memory_plan.plan(config, target)
  except (config_lib.ConfigError, plan_targets.TargetError) as e:
    sys.exit(f'error: {e}')
  calibration = (
    memory_plan.calibration() if target.compile_with == 'cpu' and target.kind == 'gpu' else None
  )
  for line in plan_report.describe(result, label, calibration):
    print(line)
  summary = result.summary()
  if calibration is not None:
    summary['cpu_calibration_mib'] = {
      'bf16_matmul_pair_temporaries': calibration[0] / 2**20,
      'fp32_same_program': calibration[1] / 2**20,
    }
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
