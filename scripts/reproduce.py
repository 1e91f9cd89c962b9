"""Reproduce the qualitative claim of one of the paper's Fig. 2, 4, 5, 7 (docs/REPRODUCTION.md).
Usage:

  python scripts/reproduce.py --figure=2 --out_dir=runs/reproduce [--parts=testbed,lm]

Writes fig<N>.json (curves, settings, claim checks with numbers) and fig<N>.png.
"""

from absl import app, flags

from bond_jax.repro import figures
from bond_jax.run import processes

_FIGURE = flags.DEFINE_enum(
  'figure', None, [name.removeprefix('fig') for name in figures.FIGURES], 'The paper figure.'
)
_OUT = flags.DEFINE_string('out_dir', 'runs/reproduce', 'Where fig<N>.json and fig<N>.png go.')
_PARTS = flags.DEFINE_list('parts', list(figures.PARTS), 'testbed (exact) and/or lm (tiny task).')
flags.mark_flags_as_required(['figure'])


def main(argv):
  del argv
  processes.cpu_unless_accelerators()
  figures.figure(f'fig{_FIGURE.value}', _OUT.value, tuple(_PARTS.value))


if __name__ == '__main__':
  app.run(main)
