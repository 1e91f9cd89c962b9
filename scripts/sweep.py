"""Expand, validate, launch and collect a sweep declared by a config file's get_sweep().

  python scripts/sweep.py --config=configs/jbond_tiny_fig6.py --root=runs/fig6 --mode=print
  python scripts/sweep.py --config=configs/jbond_tiny_fig6.py --root=runs/fig6 --mode=local
  python scripts/sweep.py --config=configs/jbond_tiny_fig6.py --root=runs/fig6 --mode=collect

print: one scripts/train.py command per unfinished run (with --launcher, each wrapped in a
template with {command} and {name}); local: run them here one after another (finished runs
are skipped, so an interrupted sweep resumes); collect: tabulate the runs' summaries.
Every member config is validated first; the manifest (commands, overrides, git revision)
goes to <root>/manifest.json.
"""

import sys

from absl import app, flags

from bond_jax.run import processes, sweep
from bond_jax.types import ConfigError

_CONFIG = flags.DEFINE_string('config', None, 'A config file with get_config() and get_sweep().')
_ROOT = flags.DEFINE_string('root', None, 'Each run goes to <root>/<name from its overrides>.')
_MODE = flags.DEFINE_enum('mode', 'print', ['print', 'local', 'collect'], 'What to do.')
_LAUNCHER = flags.DEFINE_string(
  'launcher', '{command}', 'Template of each printed line, with {command} and {name}.'
)
flags.mark_flags_as_required(['config', 'root'])


def main(argv):
  del argv
  processes.cpu_unless_accelerators()
  try:
    sweep.main(_CONFIG.value, _ROOT.value, _MODE.value, _LAUNCHER.value)
  except ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
