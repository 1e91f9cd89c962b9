"""Algorithms: Best-of-N math (`bon`), the loss terms (`objectives`), the registry of
algorithms (J-BOND, BOND, REINFORCE), the train state and the train step's phases.

Public: the names below and the modules `bon` and `objectives`. docs/ALGORITHMS.md has the
math; docs/ARCHITECTURE.md says how to add an algorithm to `REGISTRY`.
"""

from bond_jax.algo import bon, objectives
from bond_jax.algo.algorithms import REGISTRY, Algorithm, BondConfig, Targets
from bond_jax.algo.state import TrainState, init_state, make_optimizer
from bond_jax.algo.step import StepConfig, loss_and_grad, make_train_step, train_step

__all__ = [
  'REGISTRY',
  'Algorithm',
  'BondConfig',
  'StepConfig',
  'Targets',
  'TrainState',
  'bon',
  'init_state',
  'loss_and_grad',
  'make_optimizer',
  'make_train_step',
  'objectives',
  'train_step',
]
