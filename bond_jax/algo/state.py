"""The train state (policy, anchor, reference, optimizer, step, RNG) and the optimizer.

A run carries only the trees its algorithm reads: the anchor copy exists for a
moving anchor (`ema`, `periodic`) and is absent (None) for a fixed anchor, which
is pi_ref itself, and for REINFORCE, which has none; the learned quantile model of
App. B.1 and its Adam state exist only with `bond.quantile='learned'`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from bond_jax.algo import quantile_model as qm
from bond_jax.algo.algorithms import BondConfig
from bond_jax.types import PyTree


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates taken
  # With LoRA (`ModelConfig.lora`), params and anchor_params hold adapters only, and the
  # models are ref_params (the frozen base) with them attached (`step.model_params`).
  params: PyTree  # the policy pi, the only tree the optimizer sees
  anchor_params: PyTree | None  # pi_anchor, moved by EMA / period, never by gradients; or None
  ref_params: PyTree  # pi_ref, frozen (the fixed anchor, and the KL(pi || pi_ref) metric)
  opt_state: PyTree
  rng: jax.Array  # raw uint32[2] key, split every step
  quantile_params: PyTree | None = None  # learned quantile model p_theta (App. B.1), or None
  quantile_opt_state: PyTree | None = None


def make_optimizer(
  learning_rate: float,
  warmup_steps: int,
  b1: float = 0.9,
  b2: float = 0.999,
  grad_clip_norm: float = 0.0,
  mu_dtype: str | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with a linear warm-up from 0, then constant (the paper's J-BOND setting).

  With warmup_steps = 0 the first step already takes the full learning rate. `mu_dtype`
  ('bfloat16' halves it) stores Adam's first moment in that dtype (None: the parameters');
  the second moment stays in the parameters' dtype.
  """
  schedule = (
    optax.linear_schedule(0.0, learning_rate, warmup_steps)
    if warmup_steps > 0
    else optax.constant_schedule(learning_rate)
  )
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adam(schedule, b1=b1, b2=b2, mu_dtype=mu_dtype))
  return optax.chain(*parts), schedule


def init_state(
  bond: BondConfig,
  params: PyTree,
  ref_params: PyTree,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  ref_dtype: str | None = None,
) -> TrainState:
  """Policy (and the anchor, when `bond` moves one) start as copies of `params` (pi_ref;
  Algorithm 2, line 1); the learned quantile model, when `bond` uses one, from pi_ref.
  `params` may also be fresh LoRA adapters of `ref_params` (`run.setup.trained_params`):
  the optimizer, the policy and the anchor then hold adapters only.

  `ref_dtype` ('bfloat16' halves it) stores the frozen pi_ref in that dtype. The anchor
  stays in the policy's dtype: an EMA step eta * (theta - anchor) is far below bfloat16's
  resolution, so a bfloat16 anchor would never move."""
  copy = lambda tree: jax.tree.map(jnp.array, tree)  # distinct buffers: the state is donated
  learned = bond.uses_learned_quantiles
  quantile_params = qm.init_params(ref_params) if learned else None
  if ref_dtype:
    ref_params = jax.tree.map(lambda x: jnp.asarray(x, ref_dtype), ref_params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=copy(params),
    anchor_params=copy(params) if bond.keeps_anchor_copy else None,
    ref_params=copy(ref_params),
    opt_state=tx.init(params),
    rng=rng,
    quantile_params=quantile_params,
    quantile_opt_state=qm.optimizer(0.0).init(quantile_params) if learned else None,
  )


def check_state(bond: BondConfig, state: TrainState) -> None:
  """The state holds exactly the trees `bond` reads (it was built by `init_state(bond, ...)`)."""
  if (state.anchor_params is not None) != bond.keeps_anchor_copy:
    needs = 'a moving anchor needs its own copy' if bond.keeps_anchor_copy else (
      'it reads pi_ref (ref_params) as its anchor' if bond.anchor == 'fixed' else 'it has no anchor'
    )  # fmt: skip
    raise ValueError(
      f'the state {"has" if state.anchor_params is not None else "lacks"} an anchor copy, but '
      f'bond.algorithm={bond.algorithm!r} with bond.anchor={bond.anchor!r}: {needs}; build the '
      'state with init_state(bond, ...).'
    )
  if (state.quantile_params is not None) != bond.uses_learned_quantiles:
    raise ValueError(
      "the state's learned quantile model does not match bond.quantile="
      f'{bond.quantile!r}; build it with init_state(bond, ...).'
    )
