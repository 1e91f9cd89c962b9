"""The supervised stage that trains the embedded task's pi_ref (bond_jax/run/sft.py)."""

import jax
import numpy as np

from bond_jax.data import tasks
from bond_jax.models import decoder as model_lib
from bond_jax.models import presets
from bond_jax.run import sft


def test_a_one_step_supervised_run():
  """reference.sft_steps=1 used to stop optax (its cosine decay had no steps left after the
  one warm-up step). It runs now; that step's learning rate is the warm-up's start, 0, so
  the parameters stay as initialised."""
  cfg = presets.preset('tiny')
  task = tasks.NoisyCopy(vocab_size=cfg.vocab_size, prompt_len=4, keep_prob=0.9)
  rng = jax.random.key(0)
  params, loss = sft.train(cfg, task.demonstrations, rng, steps=1, batch_size=2, learning_rate=0.1)
  assert np.isfinite(loss)
  init = model_lib.init_params(cfg, jax.random.split(rng)[0])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init), strict=True):
    np.testing.assert_array_equal(a, b)
