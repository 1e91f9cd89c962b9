"""Train with BOND / J-BOND. Usage:

  python scripts/train.py --config=configs/jbond_tiny.py --workdir=runs/jbond_tiny

Override any field with --config.<field>=<value>, e.g. --config.bond.beta=1.0.
The same command with the same workdir resumes from the latest checkpoint.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bond_jax.run import config as config_lib
from bond_jax.run import loop as trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    trainer.run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
