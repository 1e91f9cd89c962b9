"""Supervised fine-tuning: how the embedded task's reference policy pi_ref is made.

Maximum likelihood on (prompt, response) pairs, loss on response tokens only.
The run trains pi_ref from scratch, deterministically from the seed, before
BOND starts; its parameters are then part of every checkpoint, so a resumed run
never trains it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling

# (rng, batch) -> (prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG)
DataFn = Callable[[jax.Array, int], tuple[jax.Array, ...]]


def nll(cfg: model_lib.ModelConfig, params: Any, batch: tuple[jax.Array, ...]) -> jax.Array:
  """Mean negative log-likelihood per response token."""
  prompt, prompt_valid, response, response_mask = batch
  logp_BxG = sampling.sequence_logprobs(cfg, params, prompt, prompt_valid, response, response_mask)
  return -jnp.sum(logp_BxG) / jnp.maximum(jnp.sum(response_mask), 1)


def train(
  cfg: model_lib.ModelConfig,
  data_fn: DataFn,
  rng: jax.Array,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float,
  chunk: int = 100,
  log: Callable[[int, float], None] | None = None,
) -> tuple[Any, float]:
  """Train a model from random init; returns (params, last chunk's mean loss)."""
  init_rng, data_rng = jax.random.split(rng)
  params = model_lib.init_params(cfg, init_rng)
  warmup = min(100, steps // 10 + 1)
  # optax needs the decay to outlast the warm-up: a one-step run decays over two.
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=learning_rate * 0.1
  )
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt_state = tx.init(params)

  @jax.jit(static_argnames='n')
  def run_chunk(params, opt_state, start, n):
    def one(carry, i):
      params, opt_state = carry
      batch = data_fn(jax.random.fold_in(data_rng, i), batch_size)
      loss, grads = jax.value_and_grad(lambda p: nll(cfg, p, batch))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), start + jnp.arange(n))
    return params, opt_state, jnp.mean(losses)

  loss = float('nan')
  for start in range(0, steps, chunk):
    n = min(chunk, steps - start)
    params, opt_state, loss_arr = run_chunk(params, opt_state, start, n)
    loss = float(loss_arr)
    if log is not None:
      log(start + n, loss)
  return params, loss
