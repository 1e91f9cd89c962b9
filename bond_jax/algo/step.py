"""Train state and the pure train step (sampling, reward, losses, update, anchor).

Algorithms (config `bond.algorithm`): 'jbond' (Algorithm 2), 'bond' (BOND with
Best-of-N of the anchor, Section 4, with MC quantiles (Eq. 10) or the learned
quantile model of Appendix B.1; with a fixed anchor it is plain BOND, with a
periodic one iterative BOND, Algorithm 1) and 'reinforce' (the KL-regularised
baseline of Section 6).

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
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from bond_jax.algo import bon
from bond_jax.algo import objectives as obj
from bond_jax.algo import quantile_model as qm
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import RewardFn


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates taken
  params: Any  # the policy pi, the only tree the optimizer sees
  anchor_params: Any  # pi_anchor: a sibling tree, moved by EMA / period, never by gradients
  ref_params: Any  # pi_ref, frozen; used for KL(pi || pi_ref) metrics
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, split every step
  # The learned quantile model p_theta (App. B.1) and its Adam state: a sibling
  # tree trained by its own loss (Eq. 25); None when the state was built without it.
  quantile_params: Any = None
  quantile_opt_state: Any = None


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
  anchor: str = 'ema'  # 'ema' | 'periodic' | 'fixed' (the anchor is pi_ref = ref_params)
  eta: float = 0.02  # EMA rate of the anchor
  anchor_period: int = 0  # steps between hard anchor updates (periodic)
  quantile: str = 'mc'  # BOND: how log p_le(y) is estimated: 'mc' (Eq. 10) | 'learned' (App. B.1)
  quantile_learning_rate: float = 1e-4  # BOND, learned quantiles: Adam step size of p_theta
  num_quantile_samples: int = 16  # BOND, MC quantiles: k anchor samples (Eq. 10)
  bon_correction: bool = False  # BOND: keep the (B) term of r_BOND (Eq. 8)
  beta_rl: float = 0.01  # REINFORCE: KL weight beta_RL (Eq. 1)
  num_policy_samples: int = 2  # REINFORCE: samples per prompt (leave-one-out baseline)


def make_optimizer(
  learning_rate: float,
  warmup_steps: int,
  b1: float = 0.9,
  b2: float = 0.999,
  grad_clip_norm: float = 0.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with a linear warm-up from 0, then constant (the paper's J-BOND setting).

  With warmup_steps = 0 the first step already takes the full learning rate.
  """
  schedule = (
    optax.linear_schedule(0.0, learning_rate, warmup_steps)
    if warmup_steps > 0
    else optax.constant_schedule(learning_rate)
  )
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adam(schedule, b1=b1, b2=b2))
  return optax.chain(*parts), schedule


def init_state(
  params: Any,
  ref_params: Any,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  *,
  quantile_model: bool = True,
) -> TrainState:
  """Policy and anchor start as copies of `params` (pi_ref; Algorithm 2, line 1).

  With `quantile_model` (the default, so that any config can select
  bond.quantile='learned') the state also holds the learned quantile model,
  initialised from pi_ref (App. B.1), and its Adam state: a second copy of the
  network and its moments. Pass False to leave them out when no run of this
  state uses learned quantiles.
  """
  copy = lambda t: jax.tree.map(jnp.array, t)  # distinct buffers: the state is donated
  quantile_params = qm.init_params(ref_params) if quantile_model else None
  quantile_opt_state = qm.optimizer(0.0).init(quantile_params) if quantile_model else None
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=copy(params),
    anchor_params=copy(params),
    ref_params=copy(ref_params),
    opt_state=tx.init(params),
    rng=rng,
    quantile_params=quantile_params,
    quantile_opt_state=quantile_opt_state,
  )


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


def _repeat(x: jax.Array, n: int) -> jax.Array:
  return x if n == 1 else jnp.repeat(x, n, axis=0)


def _best_rows(
  tokens_BnxG: jax.Array, mask_BnxG: jax.Array, rewards_BxN: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
  """Best of the first n samples of each prompt (ties: lowest index)."""
  b, total = rewards_BxN.shape
  best_B = obj.best_of(rewards_BxN[:, :n])
  pick = lambda x: x.reshape(b, total, -1)[jnp.arange(b), best_B]
  return pick(tokens_BnxG), pick(mask_BnxG)


def _num_anchor_samples(cfg: StepConfig) -> int:
  if cfg.algorithm == 'jbond':
    return cfg.n
  if cfg.algorithm == 'bond' and cfg.quantile == 'learned':  # N for Best-of-N and Eq. 25's y'
    return cfg.n
  if cfg.algorithm == 'bond':  # N for Best-of-N, k for the quantile: the first ones are shared
    return max(cfg.n, cfg.num_quantile_samples)
  return 0


def _r_bond(cfg: StepConfig, reward_B: jax.Array, anchor_reward_BxA: jax.Array) -> jax.Array:
  """MC estimate of r_BOND (Eq. 8) from k anchor samples (Eq. 10)."""
  ref_BxK = anchor_reward_BxA[:, : cfg.num_quantile_samples]
  log_p_le_B = bon.mc_log_quantile(reward_B, ref_BxK)
  if not cfg.bon_correction:
    return log_p_le_B
  # Same estimator with strict <: equal to p_le when no sample ties y, so (B) -> N.
  k = ref_BxK.shape[-1]
  log_p_lt_B = jnp.log1p(jnp.sum(ref_BxK < reward_B[:, None], -1).astype(jnp.float32))
  log_p_lt_B = log_p_lt_B - jnp.log(k + 1.0)
  return log_p_le_B + bon.log_correction_b(log_p_lt_B, log_p_le_B, cfg.n) / (cfg.n - 1)


def _learned_r_bond(
  cfg: StepConfig,
  state: TrainState,
  rows: tuple[jax.Array, ...],
  reward_B: jax.Array,
  anchor_reward_BxA: jax.Array,
) -> tuple[jax.Array, Any, Any, dict[str, jax.Array]]:
  """r_BOND ~ log p_theta(y) (App. B.1), and one Adam step of p_theta on Eq. 25.

  The estimate comes from the parameters *before* this step's update, so it
  does not depend on this step's targets Z (which come from the same anchor
  samples as the Best-of-N sample).
  """
  z_B = qm.targets(reward_B, anchor_reward_BxA)

  def loss_fn(quantile_params):
    logit_B = qm.logits(cfg.model, quantile_params, *rows)
    return qm.bce_loss(logit_B, z_B), logit_B

  (bce, logit_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.quantile_params)
  updates, opt_state = qm.optimizer(cfg.quantile_learning_rate).update(
    grads, state.quantile_opt_state, state.quantile_params
  )
  params = optax.apply_updates(state.quantile_params, updates)
  return qm.log_quantile(obj.sg(logit_B)), params, opt_state, {'quantile_bce': bce}


def _check(cfg: StepConfig, state: TrainState) -> None:
  if cfg.algorithm not in ('jbond', 'bond', 'reinforce'):
    raise ValueError(f'bond.algorithm {cfg.algorithm!r} is unknown; use jbond, bond or reinforce.')
  if cfg.quantile not in ('mc', 'learned'):
    raise ValueError(f'bond.quantile {cfg.quantile!r} is unknown; use mc or learned.')
  if cfg.algorithm == 'bond' and cfg.quantile == 'learned':
    if state.quantile_params is None:
      raise ValueError(
        "bond.quantile='learned' needs a state built with init_state(..., quantile_model=True)."
      )
    if cfg.bon_correction:
      raise ValueError(
        "bond.bon_correction needs p_lt, which bond.quantile='learned' does "
        "not estimate; use bond.quantile='mc' or bon_correction=False."
      )


def train_step(
  state: TrainState,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  reward_params: Any = None,
  *,
  cfg: StepConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update of the configured algorithm. Returns the new state and scalar metrics.

  The reward is `cfg.reward_fn(reward_params, prompt, valid, response, mask)`.
  """
  _check(cfg, state)
  reward_fn = functools.partial(cfg.reward_fn, reward_params)
  b = prompt_BxP.shape[0]
  m = cfg.num_policy_samples if cfg.algorithm == 'reinforce' else 1
  a = _num_anchor_samples(cfg)
  rng, k_policy, k_anchor = jax.random.split(state.rng, 3)
  metrics = {}

  # A fixed anchor is pi_ref itself (plain BOND): read it from ref_params, so its
  # log-likelihoods below come from the same forward as the KL-to-pi_ref metric.
  anchor_is_ref = cfg.anchor == 'fixed' or not a
  anchor_params = state.ref_params if anchor_is_ref else state.anchor_params

  with jax.named_scope('sample'):
    pol = sampling.sample(
      cfg.model, state.params, prompt_BxP, prompt_valid_BxP, k_policy, cfg.sampling, num_samples=m
    )
    if a:
      anc = sampling.sample(
        cfg.model,
        anchor_params,
        prompt_BxP,
        prompt_valid_BxP,
        k_anchor,
        cfg.sampling,
        num_samples=a,
      )

  pol_prompt, pol_valid = _repeat(prompt_BxP, m), _repeat(prompt_valid_BxP, m)
  with jax.named_scope('reward'):
    reward_Bm = reward_fn(pol_prompt, pol_valid, pol.tokens_BxG, pol.mask_BxG)
    if a:
      anchor_reward_BxA = reward_fn(
        _repeat(prompt_BxP, a), _repeat(prompt_valid_BxP, a), anc.tokens_BxG, anc.mask_BxG
      ).reshape(b, a)
      bon_tokens, bon_mask = _best_rows(anc.tokens_BxG, anc.mask_BxG, anchor_reward_BxA, cfg.n)
      metrics['reward_anchor'] = jnp.mean(anchor_reward_BxA)
      metrics['reward_anchor_best'] = jnp.mean(jnp.max(anchor_reward_BxA[:, : cfg.n], -1))

  with jax.named_scope('reference_logprobs'):
    logp_ref_Bm = _logp(cfg, state.ref_params, pol_prompt, pol_valid, pol.tokens_BxG, pol.mask_BxG)
    # REINFORCE has no anchor: its KL is to pi_ref.
    logp_anchor_Bm = (
      logp_ref_Bm
      if anchor_is_ref
      else _logp(cfg, anchor_params, pol_prompt, pol_valid, pol.tokens_BxG, pol.mask_BxG)
    )

  quantile_params, quantile_opt_state = state.quantile_params, state.quantile_opt_state
  if cfg.algorithm == 'jbond':
    r_B = bon.jbond_reward(reward_Bm, anchor_reward_BxA, cfg.n)  # Eq. 17
    reward_scale = 1.0
    metrics['frac_penalized'] = jnp.mean(r_B < 0)
  elif cfg.algorithm == 'bond':
    reward_scale = cfg.n - 1.0  # (N - 1) r_BOND: the backward KL in nats (Eq. 15)
    if cfg.quantile == 'mc':
      r_B = _r_bond(cfg, reward_Bm, anchor_reward_BxA)  # Eq. 8 with Eq. 10
      metrics['log_quantile'] = jnp.mean(
        bon.mc_log_quantile(reward_Bm, anchor_reward_BxA[:, : cfg.num_quantile_samples])
      )
    else:
      r_B, quantile_params, quantile_opt_state, q_metrics = _learned_r_bond(
        cfg,
        state,
        (pol_prompt, pol_valid, pol.tokens_BxG, pol.mask_BxG),
        reward_Bm,
        anchor_reward_BxA,
      )
      metrics.update(q_metrics, log_quantile=jnp.mean(r_B))

  # Rows that carry the gradient: policy samples, then (BOND family) Best-of-n samples.
  if a:
    rows = [
      (pol_prompt, pol_valid, pol.tokens_BxG, pol.mask_BxG),
      (prompt_BxP, prompt_valid_BxP, bon_tokens, bon_mask),
    ]
    rows = [jnp.concatenate(parts) for parts in zip(*rows, strict=True)]
  else:
    rows = [pol_prompt, pol_valid, pol.tokens_BxG, pol.mask_BxG]

  def loss_fn(params):
    logp_rows = _logp(cfg, params, *rows)
    logp_Bm = logp_rows[: b * m]
    if cfg.algorithm == 'reinforce':
      advantage = obj.reinforce_advantage(
        reward_Bm.reshape(b, m), logp_Bm.reshape(b, m), logp_ref_Bm.reshape(b, m), cfg.beta_rl
      )
      terms = {'loss_pg': obj.policy_gradient_loss(logp_Bm, advantage.reshape(-1))}
      return terms['loss_pg'], (terms, logp_Bm)
    advantage_B = obj.backward_kl_advantage(
      r_B, logp_Bm, logp_anchor_Bm, reward_scale, use_baseline=cfg.use_baseline
    )
    terms = {
      'loss_fwd': obj.forward_kl_loss(logp_rows[b:]),
      'loss_bwd': obj.policy_gradient_loss(logp_Bm, advantage_B),
      'loss_reg': obj.kl_regularizer_loss(logp_Bm, logp_anchor_Bm),
    }
    total = (
      (1.0 - cfg.beta) * terms['loss_fwd']
      + cfg.beta * terms['loss_bwd']
      + cfg.gamma * terms['loss_reg']
    )
    return total, (terms, logp_Bm)

  with jax.named_scope('update'):
    (loss, (terms, logp_Bm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_step = state.step + 1
    anchor_params = _update_anchor(cfg, state.anchor_params, params, new_step)

  generated = jnp.sum(pol.mask_BxG) + (jnp.sum(anc.mask_BxG) if a else 0)
  metrics.update(
    {
      'loss': loss,
      **terms,
      'reward_policy': jnp.mean(reward_Bm),
      'kl_ref': jnp.mean(logp_Bm - logp_ref_Bm),
      'kl_anchor': jnp.mean(logp_Bm - logp_anchor_Bm),
      'grad_norm': optax.global_norm(grads),
      'learning_rate': schedule(state.step),
      'policy_length': jnp.mean(jnp.sum(pol.mask_BxG, axis=-1)),
      'generated_tokens': generated,
    }
  )
  new_state = TrainState(
    step=new_step,
    params=params,
    anchor_params=anchor_params,
    ref_params=state.ref_params,
    opt_state=opt_state,
    rng=rng,
    quantile_params=quantile_params,
    quantile_opt_state=quantile_opt_state,
  )
  return new_state, metrics


def make_train_step(
  cfg: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step(state, prompt_BxP, prompt_valid_BxP[, reward_params]), state donated."""

  def step(state, prompt_BxP, prompt_valid_BxP, reward_params=None):
    return train_step(
      state, prompt_BxP, prompt_valid_BxP, reward_params, cfg=cfg, tx=tx, schedule=schedule
    )

  return jax.jit(step, donate_argnames='state')
