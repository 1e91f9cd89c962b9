"""Shared fixtures: a tiny decoder with random weights and the embedded task."""

import jax
import pytest

from bond_jax.data import tasks
from bond_jax.models import decoder as model_lib


@pytest.fixture(scope='session')
def tiny_cfg() -> model_lib.ModelConfig:
  return model_lib.preset(
    'tiny', num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=2, head_dim=8
  )


@pytest.fixture(scope='session')
def tiny_params(tiny_cfg):
  return model_lib.init_params(tiny_cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope='session')
def copy_task(tiny_cfg) -> tasks.NoisyCopy:
  return tasks.NoisyCopy(vocab_size=tiny_cfg.vocab_size, prompt_len=4, keep_prob=0.5)
