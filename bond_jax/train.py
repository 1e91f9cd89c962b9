"""Train state and the pure train step (sampling, reward, losses, update, anchor).

`train_step` is one module-level pure function: sample the policy and the
anchor, score the samples, build the loss of the chosen algorithm, take an
optax step, move the anchor. Tests call it un-jitted; `make_train_step` jits it
with the state donated.

J-BOND (ALGORITHMS.md section 6, Algorithm 2), per prompt x:
  y ~ pi(x); y_1..y_n ~ pi_anchor(x)
  loss_fwd = -log pi(y_best)                                  (Eq. 13, n = 2)
  R        = r_J(y) - (log pi(y) - log pi_anchor(y)) - b      (Eq. 15 with Eq. 17)
  loss_bwd = -sg(R) log pi(y)
  loss_reg =  sg(log pi(y) - log pi_anchor(y)) log pi(y)      (Eq. 19)
  loss     = (1 - beta) loss_fwd + beta loss_bwd + gamma loss_reg
  anchor  <- (1 - eta) anchor + eta theta                     (Eq. 18)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from bond_jax import bon, sampling
from bond_jax import model as model_lib
from bond_jax import objectives as obj

# (prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG) -> reward_B
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates taken
  params: Any  # the policy pi, the only tree the optimizer sees
  anchor_params: Any  # pi_anchor: a sibling tree, moved by EMA / period, never by gradients
  ref_params: Any  # pi_ref, frozen; used for KL(pi || pi_ref) metrics
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, split every step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about the step. Hashable, built from the config by config_lib."""

  model: model_lib.ModelConfig
  sampling: sampling.SamplingParams
  reward_fn: RewardFn
  algorithm: str = 'jbond'
  beta: float = 0.5  # Jeffreys weight: 0 = forward KL only, 1 = backward KL only
  n: int = 2  # anchor samples per prompt (J-BOND: n; Best-of-n of the anchor)
  gamma: float = 0.0  # weight of the extra KL(pi || anchor) term
  use_baseline: bool = True  # leave-one-out baseline in the backward-KL advantage
  anchor: str = 'ema'  # 'ema' | 'periodic' | 'fixed'
  eta: float = 0.02  # EMA rate of the anchor
  anchor_period: int = 0  # steps between hard anchor updates (periodic)


def make_optimizer(learning_rate: float, warmup_steps: int, b1: float = 0.9, b2: float = 0.999,
                   grad_clip_norm: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with a linear warm-up from 0, then constant (the paper's J-BOND setting)."""
  schedule = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adam(schedule, b1=b1, b2=b2))
  return optax.chain(*parts), schedule


def init_state(params: Any, ref_params: Any, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Policy and anchor start as copies of pi_ref (Algorithm 2, line 1)."""
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (distinct buffers: params get donated)
  return TrainState(step=jnp.zeros((), jnp.int32), params=copy(params),
                    anchor_params=copy(params), ref_params=ref_params,
                    opt_state=tx.init(params), rng=rng)


def _logp(cfg: StepConfig, params: Any, prompt, valid, tokens, mask) -> jax.Array:
  return sampling.sequence_logprobs(cfg.model, params, prompt, valid, tokens, mask).sum(-1)


def _update_anchor(cfg: StepConfig, anchor: Any, params: Any, new_step: jax.Array) -> Any:
  if cfg.anchor == 'fixed':
    return anchor
  if cfg.anchor == 'ema':
    return optax.incremental_update(params, anchor, cfg.eta)
  if cfg.anchor == 'periodic':
    refresh = (new_step % cfg.anchor_period) == 0
    return jax.tree.map(lambda a, p: jnp.where(refresh, p, a), anchor, params)
  raise ValueError(f'bond.anchor must be ema, periodic or fixed, got {cfg.anchor!r}.')


def train_step(state: TrainState, prompt_BxP: jax.Array, prompt_valid_BxP: jax.Array, *,
               cfg: StepConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One J-BOND update. Returns the new state and scalar metrics."""
  if cfg.algorithm != 'jbond':
    raise ValueError(f'bond.algorithm {cfg.algorithm!r} is not implemented; use jbond.')
  b, n = prompt_BxP.shape[0], cfg.n
  rng, k_policy, k_anchor = jax.random.split(state.rng, 3)

  with jax.named_scope('sample'):
    pol = sampling.sample(cfg.model, state.params, prompt_BxP, prompt_valid_BxP, k_policy,
                          cfg.sampling)
    anc = sampling.sample(cfg.model, state.anchor_params, prompt_BxP, prompt_valid_BxP,
                          k_anchor, cfg.sampling, num_samples=n)

  with jax.named_scope('reward'):
    reward_B = cfg.reward_fn(prompt_BxP, prompt_valid_BxP, pol.tokens_BxG, pol.mask_BxG)
    rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    anchor_reward_BxN = cfg.reward_fn(rep(prompt_BxP), rep(prompt_valid_BxP), anc.tokens_BxG,
                                      anc.mask_BxG).reshape(b, n)
    best_B = obj.best_of(anchor_reward_BxN)
    pick = lambda x: x.reshape(b, n, -1)[jnp.arange(b), best_B]  # noqa: E731
    bon_tokens_BxG, bon_mask_BxG = pick(anc.tokens_BxG), pick(anc.mask_BxG)
    r_j_B = bon.jbond_reward(reward_B, anchor_reward_BxN, n)

  with jax.named_scope('reference_logprobs'):
    logp_anchor_B = _logp(cfg, state.anchor_params, prompt_BxP, prompt_valid_BxP,
                          pol.tokens_BxG, pol.mask_BxG)
    logp_ref_B = _logp(cfg, state.ref_params, prompt_BxP, prompt_valid_BxP, pol.tokens_BxG,
                       pol.mask_BxG)

  # The policy sample and the best anchor sample go through one batched forward.
  both_prompt = jnp.concatenate([prompt_BxP, prompt_BxP])
  both_valid = jnp.concatenate([prompt_valid_BxP, prompt_valid_BxP])
  both_tokens = jnp.concatenate([pol.tokens_BxG, bon_tokens_BxG])
  both_mask = jnp.concatenate([pol.mask_BxG, bon_mask_BxG])

  def loss_fn(params):
    logp_2B = _logp(cfg, params, both_prompt, both_valid, both_tokens, both_mask)
    logp_B, logp_bon_B = logp_2B[:b], logp_2B[b:]
    advantage_B = obj.backward_kl_advantage(r_j_B, logp_B, logp_anchor_B,
                                            use_baseline=cfg.use_baseline)
    terms = {
        'loss_fwd': obj.forward_kl_loss(logp_bon_B),
        'loss_bwd': obj.policy_gradient_loss(logp_B, advantage_B),
        'loss_reg': obj.kl_regularizer_loss(logp_B, logp_anchor_B),
    }
    total = ((1.0 - cfg.beta) * terms['loss_fwd'] + cfg.beta * terms['loss_bwd']
             + cfg.gamma * terms['loss_reg'])
    return total, (terms, logp_B)

  with jax.named_scope('update'):
    (loss, (terms, logp_B)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_step = state.step + 1
    anchor_params = _update_anchor(cfg, state.anchor_params, params, new_step)

  metrics = {
      'loss': loss,
      **terms,
      'reward_policy': jnp.mean(reward_B),
      'reward_anchor': jnp.mean(anchor_reward_BxN),
      'reward_anchor_best': jnp.mean(jnp.max(anchor_reward_BxN, axis=-1)),
      'kl_ref': jnp.mean(logp_B - logp_ref_B),
      'kl_anchor': jnp.mean(logp_B - logp_anchor_B),
      'frac_penalized': jnp.mean(r_j_B < 0),
      'grad_norm': optax.global_norm(grads),
      'learning_rate': schedule(state.step),
      'policy_length': jnp.mean(jnp.sum(pol.mask_BxG, axis=-1)),
      'generated_tokens': jnp.sum(pol.mask_BxG) + jnp.sum(anc.mask_BxG),
  }
  new_state = TrainState(step=new_step, params=params, anchor_params=anchor_params,
                         ref_params=state.ref_params, opt_state=opt_state, rng=rng)
  return new_state, metrics


def make_train_step(cfg: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule
                    ) -> Callable[[TrainState, jax.Array, jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step, with the train state donated."""

  def step(state, prompt_BxP, prompt_valid_BxP):
    return train_step(state, prompt_BxP, prompt_valid_BxP, cfg=cfg, tx=tx, schedule=schedule)

  return jax.jit(step, donate_argnames='state')
