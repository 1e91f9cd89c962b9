"""After its first step the loop compiles no step again: 50 steps of a micro run, counting
every XLA compilation (JAX's own monitoring events) as each step's metrics are written.
The run's final evaluation (after the last step's metrics) is left out: it compiles its own
programs after everything counted here, and other tests cover it."""

import jax

from bond_jax.run import loop as trainer
from bond_jax.run import metrics
from tests.run.test_loop import micro_config

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def test_no_compilation_after_the_first_step(tmp_path, monkeypatch):
  compiles = []

  def listen(event, duration, **kwargs):
    if event == COMPILE_EVENT:
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  after = []  # compilations so far, when each step's metrics are written
  write = metrics.MetricWriter.write

  def counted_write(self, step, values):
    after.append(len(compiles))
    return write(self, step, values)

  monkeypatch.setattr(metrics.MetricWriter, 'write', counted_write)
  # The evaluation table comes after the last write: skipping it changes no count above.
  monkeypatch.setattr(trainer, 'evaluate_state', lambda c, setup, state, workdir: {})
  c = micro_config(50)
  c.ckpt.every = 10  # saves between steps are counted too
  try:
    trainer.run(c, tmp_path / 'run')
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert len(after) == 50
  assert after[0] > 0  # the first step compiled (the count sees compilations) ...
  # ... then nothing up to the first checkpoint (after step 10), which compiles its one
  # finiteness check (`checkpoint.all_finite`), and nothing after that.
  assert after[9] == after[0], f'{after[9] - after[0]} compilations in steps 2-10'
  assert after[10] - after[9] <= 1, f'{after[10] - after[9]} compilations at the first save'
  assert after[-1] == after[10], f'{after[-1] - after[10]} compilations in steps 12-50'
