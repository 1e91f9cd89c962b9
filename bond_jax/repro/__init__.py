"""Reproductions of the paper's figures (docs/REPRODUCTION.md): `figures.figure(name)` runs
one on the exact testbed and the tiny task; `experiments` holds the curves' runners.

Public: the modules `figures` and `experiments`.
"""

from bond_jax.repro import experiments, figures

__all__ = ['experiments', 'figures']
