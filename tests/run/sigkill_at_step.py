"""scripts/train.py as it is, except that the process sends itself SIGKILL as soon as it has
written step STEP's metrics row: tests/run/test_reliability.py's kill between two
checkpoints, at a step of its choosing however busy the machine is (a test that polls
metrics.jsonl and kills from outside can see the step too late on a loaded machine).

  python tests/run/sigkill_at_step.py STEP [scripts/train.py flags ...]

Not collected by pytest (the name does not start with test_).
"""

import os
import pathlib
import runpy
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main() -> None:
  kill_at, argv = int(sys.argv[1]), sys.argv[2:]
  sys.path.insert(0, str(ROOT))
  from bond_jax.run import metrics

  write = metrics.MetricWriter.write

  def write_then_die(self, step, scalars):
    write(self, step, scalars)
    if step >= kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  metrics.MetricWriter.write = write_then_die
  script = ROOT / 'scripts' / 'train.py'
  sys.argv = [str(script), *argv]
  runpy.run_path(str(script), run_name='__main__')


if __name__ == '__main__':
  main()
