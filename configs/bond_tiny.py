"""BOND (Section 4) on the embedded noisy-copy task: Best-of-8 of a fixed anchor, MC quantiles.

Command (from the repository root; the argument after ':' is beta, default 0.5):

  python scripts/train.py --config=configs/bond_tiny.py:0.5 --workdir=runs/bond_tiny_b05

The tiny analogue of the paper's XSum setting (Fig. 2, configs/bond_xsum.py):
the anchor stays pi_ref (bond.anchor='fixed'); each step samples 1 policy and
k = 16 anchor generations per prompt, the first N = 8 of which are the
Best-of-N candidates of the forward-KL term, and r_BOND = log p_le(y) comes
from all 16 (Eq. 10). beta = 0 is SFT on Best-of-8 samples, beta = 1 the
policy gradient of Eq. 15, 0.5 the Jeffreys mix. Set bond.quantile='learned'
for the learned quantile model of Appendix B.1 instead.

Sized for a 2-core CPU (pi_ref by supervised learning, 300 BOND steps of 32 prompts,
the evaluation table). Expected: the reward rises to about Best-of-8 of pi_ref at a KL
near Best-of-8's own (log 8 - 7/8); docs/REPRODUCTION.md (Fig. 2) has the measured figures.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """jbond_tiny.py with the fields below changed; every other field (and its comment) is there."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_tiny.py'))
  c.bond.algorithm = 'bond'
  c.bond.beta = 0.5 if arg is None else float(arg)  # beta (Eq. 11), from the ':' argument
  c.bond.n = 8  # N of Best-of-N
  c.bond.anchor = 'fixed'  # anchor = pi_ref: plain BOND
  c.train.num_steps = 300
  c.train.batch_size = 32
  return c
