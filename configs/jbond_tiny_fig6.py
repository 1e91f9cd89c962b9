"""Fig. 6 of the paper on the tiny task: J-BOND over the EMA rate eta and the extra KL
weight gamma, as a sweep (16 runs of configs/jbond_tiny.py, each with its own workdir).

Commands (from the repository root):

  python scripts/sweep.py --config=configs/jbond_tiny_fig6.py --root=runs/fig6 --mode=local
  python scripts/sweep.py --config=configs/jbond_tiny_fig6.py --root=runs/fig6 --mode=collect
  python scripts/plot.py --workdirs='runs/fig6/*' --out=runs/fig6/plots

The paper's claims (Section 6, Fig. 6): a larger eta raises the reward faster; a larger
gamma slows the growth of KL(pi || pi_ref). docs/REPRODUCTION.md has the measured table and
what does and does not reproduce. Each run costs what the tiny default does
(docs/BENCHMARKS.md), 16 times over.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib
from bond_jax.run import sweep


def get_config() -> ml_collections.ConfigDict:
  """jbond_tiny.py as it is; the sweep below sets eta and gamma."""
  return config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_tiny.py'))


def get_sweep() -> list[dict]:
  return sweep.grid({'bond.eta': [0.01, 0.02, 0.05, 0.1], 'bond.gamma': [0.0, 0.5, 1.0, 2.0]})
