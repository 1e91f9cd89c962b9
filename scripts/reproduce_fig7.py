"""Reproduce the qualitative claim of the paper's Fig. 7 (docs/REPRODUCTION.md). Usage:

  python scripts/reproduce_fig7.py --out_dir=runs/reproduce [--parts=testbed,lm]

Writes fig7.json (curves, settings, claim checks with numbers) and fig7.png.
"""

import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bond_jax.repro import figures  # noqa: E402

_OUT = flags.DEFINE_string('out_dir', 'runs/reproduce', 'Where fig7.json and fig7.png go.')
_PARTS = flags.DEFINE_list('parts', list(figures.PARTS), 'testbed (exact) and/or lm (tiny task).')


def main(argv):
  del argv
  figures.figure('fig7', _OUT.value, tuple(_PARTS.value))


if __name__ == '__main__':
  app.run(main)
