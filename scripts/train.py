"""Train with BOND / J-BOND. Usage:

  python scripts/train.py --config=configs/jbond_tiny.py --workdir=runs/jbond_tiny

Override any field with --config.<field>=<value>, e.g. --config.bond.beta=1.0.
The same command with the same workdir resumes from the latest checkpoint; SIGTERM or
Ctrl-C saves the current step first (exit status 128 + the signal).

Several processes (hosts) train one run together when flags or the environment say so;
each process runs the same command and `jax.distributed.initialize` joins them:

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit (any cluster)
  --distributed                          JAX finds them itself (TPU pod slices, SLURM, Open MPI)
  JAX_COORDINATOR_ADDRESS, or SLURM / Open MPI with more than one task   the same, unasked

The mesh then spans every process's devices, each process feeds its own rows of the batch,
the checkpoint directory must be shared by all of them, and only process 0 writes
config.json, metrics, TensorBoard, the progress bar, summary.json and stdout.

--profile_steps=5,6 (or a range, 5-7) writes a jax.profiler trace of exactly those steps
(numbered as in metrics.jsonl) into <workdir>/profile/steps_<first>-<last>/, on process 0.
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bond_jax.run import config as config_lib
from bond_jax.run import loop as trainer
from bond_jax.run import processes, profiling

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
_PROCESSES = processes.define_flags()
_PROFILE_STEPS = flags.DEFINE_string(
  'profile_steps',
  '',
  'Steps to trace with jax.profiler into <workdir>/profile/ (process 0), e.g. 5,6 or 5-7.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _unknown_field(argv: list[str]) -> str | None:
  """The first --config.<field> override that names no field of the config file, with a
  suggestion; None when every override names a field."""
  given = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  given += [b for a, b in zip(argv[:-1], argv[1:], strict=True) if a == '--config']
  if not given:
    return None
  path = given[-1]
  file, _, arg = path.partition(':')
  c = config_lib.load_config_file(file, arg or None)
  for override in argv:
    m = re.match(r'--config\.([\w.]+)', override)
    if not m:
      continue
    problem = config_lib.unknown_field(c, m.group(1))
    if problem:
      return f'--config.{m.group(1)}: {problem}'
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line (not a traceback) for a bad flag or override."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (ml_collections raises KeyError, AttributeError, ...)
    try:
      message = _unknown_field(argv)
    except Exception:  # noqa: BLE001 (the config file itself is broken: say the first error)
      message = None
    sys.exit(f'error: {message or str(e).strip().splitlines()[0]}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    profile_steps = profiling.parse_steps(_PROFILE_STEPS.value) if _PROFILE_STEPS.value else ()
  except ValueError as e:
    sys.exit(f'error: --profile_steps: {e}')
  try:
    processes.join(_PROCESSES)
  except (config_lib.ConfigError, trainer.RunError) as e:
    sys.exit(f'error: {e}')
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use
  except OSError as e:
    sys.exit(f'error: --config: {str(e).strip().splitlines()[-1].strip()}')
  try:
    trainer.run(config, _WORKDIR.value, profile_steps=profile_steps)
  except trainer.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except (config_lib.ConfigError, trainer.RunError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
