"""Run in a subprocess with 8 fake CPU devices (see test_multidevice.py): the same micro run
on 1 device, on 8 data-parallel devices and on a 2 x 4 data x model mesh."""

import json
import pathlib
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from bond_jax.run import loop as trainer  # noqa: E402
from tests.run.test_loop import micro_config  # noqa: E402


def main(out_dir: str) -> None:
  out = pathlib.Path(out_dir)
  assert jax.device_count() == 8
  results = {}
  for name, (data, model) in {'one': (1, 1), 'dp8': (8, 1), 'dp2_tp4': (2, 4)}.items():
    c = micro_config(3)
    c.mesh.data, c.mesh.model = data, model
    summary = trainer.run(c, out / name)
    rows = [json.loads(line) for line in (out / name / 'metrics.jsonl').read_text().splitlines()]
    results[name] = {'rows': rows, 'summary': summary}
  (out / 'results.json').write_text(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1])
