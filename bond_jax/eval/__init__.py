"""Evaluation: what the paper measures, from samples (`estimates`), the Best-of-N table
built from it (`bon_table`), the exact testbed (`testbed`) and plots of runs (`plots`).

Public: those modules. (The table's function is `bon_table.bon_table`; exporting it here
would hide the module of the same name.)
"""

from bond_jax.eval import bon_table, estimates, plots, testbed

__all__ = ['bon_table', 'estimates', 'plots', 'testbed']
