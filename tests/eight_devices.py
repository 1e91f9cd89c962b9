"""The test suite's background processes, each with 8 fake CPU devices (JAX fixes the device
count when its backend starts, and the main test process has started it with 1 device).

  python tests/eight_devices.py sharding OUT   pytest on tests/models/sharding_8dev_checks.py
  python tests/eight_devices.py runs OUT       the micro runs that tests/run reads

Not collected (the name does not start with test_): `tests/conftest.py` starts a part in the
background as soon as collection finds a test that uses its fixture, so it runs while the
main process works through the other tests, and each part writes OUT/results.json:

  sharding  {'exit_code': pytest's exit code}; the report is in the process's output
  runs      for each run below, {'workdir', 'rows' (metrics.jsonl), 'summary'}:
              one            micro_config(MICRO_STEPS) on one device
              dp8            the same on a (data, fsdp, model) = (8, 1, 1) mesh
              fsdp8          ... on (1, 8, 1)
              dp2_fsdp2_tp2  ... on (2, 2, 2)
              resumed        tests/run/test_loop.py's crash_then_resume
              lora_one, lora_dp2_fsdp2_tp2, lora_resumed
                             the same three with LoRA (micro_config(..., lora=True))
            or {'error': traceback}

The runs share pi_ref: the embedded task's supervised pi_ref is a pure function of the
config (run.setup.train_reference), trained once here (on one device, like every run's)
and reused by the later runs. The sharded runs save one checkpoint (at their end) instead
of one every 2 steps; nothing reads their checkpoints.
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

from bond_jax.models import decoder as model_lib  # noqa: E402
from bond_jax.run import loop as trainer  # noqa: E402
from bond_jax.run import setup as run_setup  # noqa: E402
from tests.run.test_loop import MICRO_STEPS, crash_then_resume, micro_config  # noqa: E402

# name: (data, fsdp, model); 'one' first (the others are compared with it)
MESHES = {'one': (1, 1, 1), 'dp8': (8, 1, 1), 'fsdp8': (1, 8, 1), 'dp2_fsdp2_tp2': (2, 2, 2)}
LORA_MESHES = {'lora_one': (1, 1, 1), 'lora_dp2_fsdp2_tp2': (2, 2, 2)}
FIELDS = ('seed', 'task', 'reference')  # with the model's base architecture, what pi_ref is made of


def sharding(out: pathlib.Path) -> dict:
  del out
  checks = ROOT / 'tests' / 'models' / 'sharding_8dev_checks.py'
  return {'exit_code': int(pytest.main(['-q', '-p', 'no:cacheprovider', str(checks)]))}


def _read(workdir: pathlib.Path, summary: dict) -> dict:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {'workdir': str(workdir), 'rows': rows, 'summary': summary}


def _share_reference() -> None:
  """run.setup.train_reference remembers each pi_ref by what it is a function of."""
  train, cache = run_setup.train_reference, {}

  def shared(c, cfg, task, verbose=False):
    fields = [c[f].to_dict() if hasattr(c[f], 'to_dict') else c[f] for f in FIELDS]
    base = model_lib.base_config(cfg)  # LoRA runs train adapters on the same pi_ref
    key = (json.dumps(fields, sort_keys=True), base, repr(task))
    if key not in cache:
      cache[key] = train(c, cfg, task, verbose)
    return cache[key]

  run_setup.train_reference = shared


def runs(out: pathlib.Path) -> dict:
  assert jax.device_count() == 8
  _share_reference()
  # Runs on one mesh compile the same step and evaluation (fsdp8 and both halves of
  # resumed, which keeps the config's mesh (1, -1, 1)): compiled once, read back after.
  jax.config.update('jax_compilation_cache_dir', str(out / 'compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  try:
    results = {}
    for name, (data, fsdp, model) in MESHES.items():
      c = micro_config(MICRO_STEPS)
      c.mesh.data, c.mesh.fsdp, c.mesh.model = data, fsdp, model
      if name != 'one':
        c.ckpt.every = MICRO_STEPS
      results[name] = _read(out / name, trainer.run(c, out / name))
    results['resumed'] = _read(out / 'resumed', crash_then_resume(out / 'resumed'))
    # LoRA: on one device, on the (2, 2, 2) mesh, and stopped and resumed on one device (the
    # mesh of lora_one, which it must reproduce bit for bit).
    for name, (data, fsdp, model) in LORA_MESHES.items():
      c = micro_config(MICRO_STEPS, lora=True)  # checkpoints every 2 steps, as resumed does
      c.mesh.data, c.mesh.fsdp, c.mesh.model = data, fsdp, model
      results[name] = _read(out / name, trainer.run(c, out / name))
    resumed = crash_then_resume(out / 'lora_resumed', lora=True, mesh=LORA_MESHES['lora_one'])
    results['lora_resumed'] = _read(out / 'lora_resumed', resumed)
    return results
  except Exception:  # reported by the tests that read the runs, with this process's output
    return {'error': traceback.format_exc()}


PARTS = {'sharding': sharding, 'runs': runs}


if __name__ == '__main__':
  part, out_dir = sys.argv[1:]
  out = pathlib.Path(out_dir)
  (out / 'results.json').write_text(json.dumps(PARTS[part](out)))
