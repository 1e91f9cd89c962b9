"""Reproduce the qualitative claim of the paper's Fig. 2 (docs/REPRODUCTION.md). Usage:

  python scripts/reproduce_fig2.py --out_dir=runs/reproduce [--parts=testbed,lm]

Writes fig2.json (curves, settings, claim checks with numbers) and fig2.png.
"""

import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bond_jax.repro import figures  # noqa: E402

_OUT = flags.DEFINE_string('out_dir', 'runs/reproduce', 'Where fig2.json and fig2.png go.')
_PARTS = flags.DEFINE_list('parts', list(figures.PARTS), 'testbed (exact) and/or lm (tiny task).')


def main(argv):
  del argv
  figures.figure('fig2', _OUT.value, tuple(_PARTS.value))


if __name__ == '__main__':
  app.run(main)
