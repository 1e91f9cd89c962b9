"""KL-regularised REINFORCE (Eq. 1, Section 6), the baseline of Fig. 7, on the noisy-copy task.

Command (from the repository root; the argument after ':' is beta_RL, default 0.01):

  python scripts/train.py --config=configs/reinforce_tiny.py:0.01 --workdir=runs/reinforce_tiny

Maximises E_pi[r] - beta_RL KL(pi || pi_ref) by REINFORCE with
bond.num_policy_samples = 2 samples per prompt and a leave-one-out baseline among
them (always on: bond.use_baseline does not switch it); the return of a sample is
r(y) - beta_RL (log pi(y) - log pi_ref(y)). There is no anchor: none is sampled,
and the train state keeps no anchor copy, so the BOND-family fields inherited
from jbond_tiny.py (beta, n, eta, gamma, anchor, anchor_period, quantile*,
num_quantile_samples, bon_correction) are validated but not read. The paper
sweeps beta_RL in {0.001, 0.01, 0.1, 1}.

Sized for a 2-core CPU (pi_ref by supervised learning, 300 steps of 128 prompts, the
evaluation table). Expected: a small beta_RL reaches a high reward at a large KL, a large
one stops early at a small KL; docs/REPRODUCTION.md (Fig. 7) has the figures.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """jbond_tiny.py with the fields below changed; every other field (and its comment) is
  there, read as the docstring above says."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_tiny.py'))
  c.bond.algorithm = 'reinforce'
  c.bond.beta_rl = 0.01 if arg is None else float(arg)  # beta_RL (Eq. 1), from the ':' argument
  c.train.num_steps = 300  # REINFORCE updates
  return c
