"""Evaluate checkpoints of a run from its workdir (config.json + Orbax checkpoints; a damaged
latest checkpoint is skipped with a warning). Usage:

  python scripts/evaluate.py --workdir=runs/jbond_tiny
  python scripts/evaluate.py --workdir=runs/jbond_tiny --step=100 --which=anchor
  python scripts/evaluate.py --workdir=runs/jbond_tiny --all_steps --num_prompts=128
  python scripts/evaluate.py --workdir=runs/jbond_tiny --mesh.data=1 --mesh.fsdp=-1 --mesh.model=1

Prints the table (rewards of pi_ref, Best-of-N of pi_ref and the policy; the policy's KL to
pi_ref, log quantile, win rate and KLs to Best-of-eval.kl_n) and writes
<workdir>/eval/step_<N>_<which>.json (all_steps_<which>.jsonl with --all_steps); the
default, the latest policy with the run's settings, also rewrites summary.json.

A run trained across hosts is evaluated across them: start the same command on every host
with scripts/train.py's process flags (--coordinator_address, --num_processes,
--process_id, or --distributed); process 0 prints and writes.
"""

import sys

from absl import app, flags, logging

from bond_jax.run import evaluation, processes
from bond_jax.run.guards import RunError
from bond_jax.types import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A workdir written by scripts/train.py.')
_STEP = flags.DEFINE_integer('step', None, 'Evaluate this checkpoint step (default: latest).')
_ALL = flags.DEFINE_bool('all_steps', False, 'Evaluate every kept checkpoint, into one JSONL.')
_WHICH = flags.DEFINE_enum('which', 'policy', list(evaluation.WHICH), 'Which model to evaluate.')
_DATA = flags.DEFINE_integer('mesh.data', None, 'Data-parallel devices (default: the run).')
_FSDP = flags.DEFINE_integer('mesh.fsdp', None, 'FSDP devices, -1: the rest (default: the run).')
_MODEL = flags.DEFINE_integer('mesh.model', None, 'Tensor-parallel devices (default: the run).')
_PROMPTS = flags.DEFINE_integer('num_prompts', None, 'Held-out prompts (default: the run).')
_PROCESSES = processes.define_flags()
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  sizes = (_DATA.value, _FSDP.value, _MODEL.value)
  if len({size is None for size in sizes}) > 1:
    sys.exit('error: give --mesh.data, --mesh.fsdp and --mesh.model together (or none of them).')
  mesh = None if _DATA.value is None else sizes
  try:
    processes.join(_PROCESSES)
    evaluation.evaluate_workdir(
      _WORKDIR.value, step=_STEP.value, all_steps=_ALL.value, which=_WHICH.value,
      mesh_shape=mesh, num_prompts=_PROMPTS.value,
    )  # fmt: skip
  except (FileNotFoundError, ConfigError, RunError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
