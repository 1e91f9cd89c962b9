"""Evaluate a run from its workdir: reads config.json and the latest usable Orbax
checkpoint (a damaged one is skipped with a warning), prints the Best-of-N table and
rewrites summary.json. Usage:

  python scripts/evaluate.py --workdir=runs/jbond_tiny
"""

import pathlib
import sys

from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bond_jax.run import loop as trainer  # noqa: E402
from bond_jax.types import ConfigError  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A workdir written by scripts/train.py.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    trainer.evaluate_workdir(_WORKDIR.value)
  except (FileNotFoundError, ConfigError, trainer.RunError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
