"""Everything that needs 8 fake CPU devices, in one process (JAX fixes the device count when
its backend starts, and the main test process has started it with 1 device).

Not collected (the name does not start with test_): `tests/conftest.py` starts it in the
background as soon as collection finds a test that uses the `eight_devices` fixture, so
it runs while the main process works through the other tests. It writes results.json to
the directory given as its argument:

  sharding  exit code of pytest on tests/models/sharding_8dev_checks.py (its report is in
            this process's output)
  runs      {'dp8': ..., 'dp2_tp4': ...}: metrics.jsonl rows and summary of the micro run of
            tests/run/test_loop.py on 8 data-parallel devices and on a 2 x 4 data x model
            mesh (tests/run/test_multidevice.py compares them with the one-device run)
  error     the traceback if the runs failed
"""

import json
import pathlib
import sys
import traceback

import jax

jax.config.update('jax_num_cpu_devices', 8)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pytest  # noqa: E402

from bond_jax.run import loop as trainer  # noqa: E402
from tests.run.test_loop import MICRO_STEPS, micro_config  # noqa: E402

MESHES = {'dp8': (8, 1), 'dp2_tp4': (2, 4)}  # name: (data, model)


def micro_runs(out: pathlib.Path) -> dict:
  assert jax.device_count() == 8
  results = {}
  for name, (data, model) in MESHES.items():
    c = micro_config(MICRO_STEPS)
    c.mesh.data, c.mesh.model = data, model
    summary = trainer.run(c, out / name)
    rows = [json.loads(line) for line in (out / name / 'metrics.jsonl').read_text().splitlines()]
    results[name] = {'rows': rows, 'summary': summary}
  return results


def main(out_dir: str) -> None:
  out = pathlib.Path(out_dir)
  results = {
    'sharding': int(
      pytest.main(
        ['-q', '-p', 'no:cacheprovider', str(ROOT / 'tests' / 'models' / 'sharding_8dev_checks.py')]
      )
    )
  }
  try:
    results['runs'] = micro_runs(out)
  except Exception:  # reported by test_multidevice.py, with this process's output
    results['error'] = traceback.format_exc()
  (out / 'results.json').write_text(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1])
