"""Iterative BOND (Section 4.3, Algorithm 1) on the embedded noisy-copy task: n = 2.

Command (from the repository root):

  python scripts/train.py --config=configs/iterative_bond_tiny.py --workdir=runs/iterative_bond_tiny

BOND with N = n = 2 against an anchor that is reset to the current policy every
T = 50 steps (bond.anchor='periodic'): each period distils Best-of-2 of the
anchor (Jeffreys, beta = 0.5, MC quantiles from k = 16 anchor samples), so after
M periods the target is Best-of-2^M of pi_ref (Eq. 16) without ever sampling
more than 16 anchor generations per prompt.

Sized for a 2-core CPU (pi_ref by supervised learning, 400 steps of 32 prompts = 8
anchor periods, the evaluation table). Expected: the reward keeps rising where BOND with a
fixed N saturates at Best-of-N of pi_ref; docs/REPRODUCTION.md (Fig. 4) has the figures.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """jbond_tiny.py with the fields below changed; every other field (and its comment) is there."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_tiny.py'))
  c.bond.algorithm = 'bond'  # with n = 2: Best-of-2 of the anchor
  c.bond.anchor = 'periodic'  # anchor <- policy every T steps (Algorithm 1)
  c.bond.anchor_period = 50  # T
  c.train.num_steps = 400
  c.train.batch_size = 32
  return c
