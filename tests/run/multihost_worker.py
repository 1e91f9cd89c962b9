"""One process of tests/run/test_multihost.py's runs: scripts/train.py as it is, with every
path the process opens for writing, renames to or removes recorded by an audit hook and
written to RECORD (a JSON list) when it exits.

  python tests/run/multihost_worker.py RECORD [scripts/train.py flags ...]
  python tests/run/multihost_worker.py RECORD scripts/evaluate.py [its flags ...]

With MULTIHOST_WORKER_NO_EVALUATION=1 the run ends after its last checkpoint, without the
final evaluation (as if it crashed there; a resumed run evaluates).

SIGUSR1 prints every thread's Python stack to stderr (the test sends it to a launch that
hangs, before killing it).

Not collected by pytest (the name does not start with test_).
"""

import atexit
import faulthandler
import json
import os
import pathlib
import runpy
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _path(p) -> str | None:
  if isinstance(p, str | bytes | os.PathLike):
    return os.path.abspath(os.fsdecode(p))
  return None  # a file descriptor


def main() -> None:
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  record, argv = pathlib.Path(sys.argv[1]), sys.argv[2:]
  touched: set[str] = set()

  def hook(event: str, args: tuple) -> None:
    if event == 'open':
      path, mode, flags = args
      writes = (isinstance(mode, str) and any(ch in mode for ch in 'wax+')) or (
        isinstance(flags, int) and flags & _WRITES
      )
      if writes and (p := _path(path)):
        touched.add(p)
    elif event in ('os.rename', 'os.remove') and (
      p := _path(args[1 if event == 'os.rename' else 0])
    ):
      touched.add(p)

  sys.addaudithook(hook)
  if os.environ.get('MULTIHOST_WORKER_NO_EVALUATION') == '1':
    sys.path.insert(0, str(ROOT))
    from bond_jax.run import loop

    loop.evaluate_state = lambda *args: {}
  atexit.register(lambda: record.write_text(json.dumps(sorted(touched))))
  script = ROOT / 'scripts' / 'train.py'
  if argv and argv[0].startswith('scripts/'):  # another script of the repository
    script, argv = ROOT / argv[0], argv[1:]
  sys.argv = [str(script), *argv]
  runpy.run_path(str(script), run_name='__main__')


if __name__ == '__main__':
  main()
