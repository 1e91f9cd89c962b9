"""The test suite's background processes, each with 8 fake CPU devices (JAX fixes the device
count when its backend starts, and the main test process has started it with 1 device).

  python tests/eight_devices.py sharding OUT   pytest on tests/models/sharding_8dev_checks.py
  python tests/eight_devices.py runs OUT       the micro runs that tests/run reads

Not collected (the name does not start with test_): `tests/conftest.py` starts a part in the
background as soon as collection finds a test that uses its fixture, so it runs while the
main process works through the other tests, and each part writes OUT/results.json:

  sharding  {'exit_code': pytest's exit code}; the report is in the process's output
  runs      for each run below, {'workdir', 'rows' (metrics.jsonl), 'summary'}:
              one      micro_config(MICRO_STEPS) on one device
              dp8      the same on 8 data-parallel devices
              dp2_tp4  the same on a 2 x 4 data x model mesh
              resumed  tests/run/test_loop.py's crash_then_resume
            or {'error': traceback}
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
from tests.run.test_loop import MICRO_STEPS, crash_then_resume, micro_config  # noqa: E402

MESHES = {'one': (1, 1), 'dp8': (8, 1), 'dp2_tp4': (2, 4)}  # name: (data, model)


def sharding(out: pathlib.Path) -> dict:
  del out
  checks = ROOT / 'tests' / 'models' / 'sharding_8dev_checks.py'
  return {'exit_code': int(pytest.main(['-q', '-p', 'no:cacheprovider', str(checks)]))}


def _read(workdir: pathlib.Path, summary: dict) -> dict:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {'workdir': str(workdir), 'rows': rows, 'summary': summary}


def runs(out: pathlib.Path) -> dict:
  assert jax.device_count() == 8
  try:
    results = {}
    for name, (data, model) in MESHES.items():
      c = micro_config(MICRO_STEPS)
      c.mesh.data, c.mesh.model = data, model
      results[name] = _read(out / name, trainer.run(c, out / name))
    results['resumed'] = _read(out / 'resumed', crash_then_resume(out / 'resumed'))
    return results
  except Exception:  # reported by the tests that read the runs, with this process's output
    return {'error': traceback.format_exc()}


PARTS = {'sharding': sharding, 'runs': runs}


if __name__ == '__main__':
  part, out_dir = sys.argv[1:]
  out = pathlib.Path(out_dir)
  (out / 'results.json').write_text(json.dumps(PARTS[part](out)))
