"""Runs: config checks (`config`), what a config builds, the training loop, checkpoints,
evaluation of any workdir, sweeps and memory plans. The scripts in scripts/ are thin
shells around these.

Public: the names below and the modules `config`, `sweep`, `memory_plan`, `plan_targets`.
"""

from bond_jax.run import config, memory_plan, plan_targets, sweep
from bond_jax.run.evaluation import evaluate_workdir, load_workdir
from bond_jax.run.guards import Preempted, RunError
from bond_jax.run.loop import export_policy, run

__all__ = [
  'Preempted',
  'RunError',
  'config',
  'evaluate_workdir',
  'export_policy',
  'load_workdir',
  'memory_plan',
  'plan_targets',
  'run',
  'sweep',
]
