"""Reproduce the qualitative claim of the paper's Fig. 4 (docs/REPRODUCTION.md). Usage:

  python scripts/reproduce_fig4.py --out_dir=runs/reproduce [--parts=testbed,lm]

Writes fig4.json (curves, settings, claim checks with numbers) and fig4.png.
"""

import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bond_jax.repro import figures  # noqa: E402

_OUT = flags.DEFINE_string('out_dir', 'runs/reproduce', 'Where fig4.json and fig4.png go.')
_PARTS = flags.DEFINE_list('parts', list(figures.PARTS), 'testbed (exact) and/or lm (tiny task).')


def main(argv):
  del argv
  figures.figure('fig4', _OUT.value, tuple(_PARTS.value))


if __name__ == '__main__':
  app.run(main)
