"""Plot training runs: reward and KL(pi || pi_ref) against step, the reward / KL trade-off
with pi_ref's Best-of-N curve, and the log quantile against step (one PNG each). Usage:

  python scripts/plot.py --workdirs='runs/fig6/*' --out=runs/fig6/plots [--smooth=10] [--group]

--workdirs takes paths or glob patterns (quote them, or let the shell expand them).
"""

import glob
import pathlib
import sys

from absl import app, flags

from bond_jax.eval import plots

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Workdirs written by scripts/train.py (globs ok).')
_OUT = flags.DEFINE_string('out', None, 'Directory for the PNGs.')
_SMOOTH = flags.DEFINE_integer('smooth', 10, 'Moving average over this many logged steps.')
_GROUP = flags.DEFINE_bool(
  'group', False, 'Sweep runs (field_value-field_value): one panel per value of the first field.'
)
flags.mark_flags_as_required(['workdirs', 'out'])


def main(argv):
  workdirs = sorted({p for pattern in _WORKDIRS.value + argv[1:] for p in glob.glob(pattern)})
  workdirs = [p for p in workdirs if pathlib.Path(p, 'metrics.jsonl').is_file()]
  try:
    written = plots.plot_workdirs(workdirs, _OUT.value, _SMOOTH.value, _GROUP.value)
  except FileNotFoundError as e:
    sys.exit(f'error: {e} (from --workdirs={",".join(_WORKDIRS.value)})')
  print('\n'.join(str(p) for p in written))


if __name__ == '__main__':
  app.run(main)
