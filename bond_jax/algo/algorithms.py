"""The algorithms of the paper as one registry: knobs, sample counts, returns and loss.

Each algorithm is an `Algorithm` entry in `REGISTRY`, keyed by `bond.algorithm`:

  samples(bond)                  -> (policy samples, anchor samples) per prompt
  targets(bond, model, state, rollout) -> Targets: the returns the loss needs (no gradient)
  loss(bond, targets, logp_B, logp_bon_B) -> (total, named terms), differentiated w.r.t.
                                     the policy through logp_B (its samples) and logp_bon_B
                                     (the Best-of-n samples it imitates, if any)

Adding an algorithm is one `targets` function (and a loss, unless an existing one fits)
and one registry entry. The math follows ALGORITHMS.md; equations are the paper's.

  J-BOND (Algorithm 2, section 6): y ~ pi, y_1..y_n ~ pi_anchor,
    loss = (1 - beta) * -log pi(y_best)                                   (Eq. 13)
         + beta * -sg(r_J(y) - (log pi(y) - log pi_anchor(y)) - b) log pi(y)   (Eq. 15, 17)
         + gamma * sg(log pi(y) - log pi_anchor(y)) log pi(y)             (Eq. 19)
  BOND (section 4): as J-BOND with Best-of-N of the anchor and (N - 1) r_BOND in nats in
    place of r_J (Eq. 8, 10, 15); with a fixed anchor plain BOND, with a periodic one
    iterative BOND (Algorithm 1).
  REINFORCE (Eq. 1, section 6): M samples per prompt, return r(y) - beta_RL (log pi(y) -
    log pi_ref(y)), leave-one-out baseline within each prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import struct

from bond_jax.algo import bon, objectives
from bond_jax.algo import quantile_model as qm
from bond_jax.algo.rollout import Rollout, Rows, best_of
from bond_jax.models.decoder import ModelConfig
from bond_jax.types import ConfigError, PyTree

ANCHORS = ('ema', 'periodic', 'fixed')
QUANTILES = ('mc', 'learned')


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'config.bond.{field}={value!r} is invalid: {allowed}.')


def _is_int(value: Any, minimum: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclasses.dataclass(frozen=True)
class BondConfig:
  """The algorithm's knobs: exactly the fields of a config's `bond` block, checked here."""

  algorithm: str = 'jbond'  # a key of REGISTRY
  beta: float = 0.5  # Jeffreys weight: 0 = forward KL only, 1 = backward KL only (Eq. 11)
  n: int = 2  # J-BOND: anchor samples per prompt; BOND: N of Best-of-N of the anchor
  gamma: float = 0.0  # weight of the extra KL(pi || anchor) term (Eq. 19)
  use_baseline: bool = True  # leave-one-out baseline in the backward-KL return
  anchor: str = 'ema'  # 'ema' | 'periodic' | 'fixed' (the anchor is pi_ref = ref_params)
  eta: float = 0.02  # EMA rate of the anchor (Eq. 18)
  anchor_period: int = 0  # T: steps between hard anchor updates ('periodic')
  quantile: str = 'mc'  # BOND: log p_le by 'mc' (Eq. 10) or the 'learned' model (App. B.1)
  quantile_learning_rate: float = 1e-4  # BOND, learned quantiles: Adam step size of p_theta
  num_quantile_samples: int = 16  # BOND, MC quantiles: k anchor samples (Eq. 10)
  # BOND: keep the (B) term of r_BOND (Eq. 8). With MC quantiles (B) is the constant N unless
  # a sample ties r(y) (bon.mc_log_quantiles): a shift the leave-one-out baseline removes.
  bon_correction: bool = False
  beta_rl: float = 0.01  # REINFORCE: KL weight beta_RL (Eq. 1)
  num_policy_samples: int = 2  # REINFORCE: samples per prompt (leave-one-out baseline)

  def __post_init__(self):
    _check(self.algorithm in REGISTRY, 'algorithm', self.algorithm, f'one of {tuple(REGISTRY)}')
    _check(0.0 <= self.beta <= 1.0, 'beta', self.beta, 'Jeffreys weight beta must be in [0, 1]')
    _check(0.0 <= self.eta <= 1.0, 'eta', self.eta, 'EMA rate eta must be in [0, 1]')
    _check(self.gamma >= 0.0, 'gamma', self.gamma, 'KL weight gamma must be >= 0')
    _check(_is_int(self.n, 2), 'n', self.n, 'n (anchor samples / N) must be an integer >= 2')
    _check(self.anchor in ANCHORS, 'anchor', self.anchor, f'one of {ANCHORS}')
    if self.anchor == 'periodic':
      _check(
        _is_int(self.anchor_period, 1),
        'anchor_period',
        self.anchor_period,
        "must be an integer > 0 with anchor='periodic'",
      )
    _check(self.quantile in QUANTILES, 'quantile', self.quantile, f'one of {QUANTILES}')
    if self.quantile == 'learned':
      _check(
        self.algorithm == 'bond',
        'quantile',
        self.quantile,
        "learned quantiles are used by algorithm 'bond' only; use 'mc' otherwise",
      )
      _check(
        not self.bon_correction,
        'bon_correction',
        self.bon_correction,
        'the (B) correction needs p_lt, which the learned model does not estimate',
      )
      _check(
        self.quantile_learning_rate > 0,
        'quantile_learning_rate',
        self.quantile_learning_rate,
        'must be > 0',
      )
    _check(
      _is_int(self.num_quantile_samples, 1),
      'num_quantile_samples',
      self.num_quantile_samples,
      'must be an integer > 0',
    )
    _check(self.beta_rl >= 0.0, 'beta_rl', self.beta_rl, 'beta_RL must be >= 0')
    _check(
      _is_int(self.num_policy_samples, 2),
      'num_policy_samples',
      self.num_policy_samples,
      'REINFORCE needs an integer >= 2 samples per prompt',
    )

  @property
  def keeps_anchor_copy(self) -> bool:
    """A moving anchor is a tree of its own; a fixed one is pi_ref; REINFORCE has none."""
    return REGISTRY[self.algorithm].samples(self)[1] > 0 and self.anchor != 'fixed'

  @property
  def update_rows_per_prompt(self) -> int:
    """Rows of a prompt in the update: its policy samples and, for the BOND family (which
    imitates Best-of-n samples of the anchor), its Best-of-n row."""
    return REGISTRY[self.algorithm].samples(self)[0] + (self.algorithm != 'reinforce')

  @property
  def uses_learned_quantiles(self) -> bool:
    return self.algorithm == 'bond' and self.quantile == 'learned'


class StateView(Protocol):
  """What a targets function may read of the train state (`algo.state.TrainState`)."""

  params: PyTree
  ref_params: PyTree
  quantile_params: PyTree | None
  quantile_opt_state: PyTree | None


@struct.dataclass
class Targets:
  """What an algorithm's loss needs besides the policy's log-likelihoods (all stop-gradient)."""

  reward_B: jax.Array  # r(y) of each policy row in nats: r_J, (N - 1) r_BOND or the reward
  logp_base_B: jax.Array  # log pi_base(y): the anchor (BOND family) or pi_ref (REINFORCE)
  bon_rows: Rows | None = None  # Best-of-n samples of the anchor that the forward KL imitates
  metrics: dict[str, jax.Array] = struct.field(default_factory=dict)
  # With a learned quantile model (App. B.1): its BCE labels Z of the policy rows (Eq. 25),
  # for its own update (`quantile_update`, the step's phase after the targets).
  quantile_z_B: jax.Array | None = None


# ---------------------------------------------------------------------------
# Returns of each algorithm.


def jbond_targets(
  bond: BondConfig, model: ModelConfig, state: StateView, rollout: Rollout
) -> Targets:
  """J-BOND (Algorithm 2): r_J = alpha_n if y is worse than all n anchor samples (Eq. 17)."""
  del model, state
  r_B = bon.jbond_reward(rollout.policy_reward_B, rollout.anchor_reward_BxA, bond.n)
  return Targets(
    reward_B=r_B,
    logp_base_B=rollout.logp_anchor_B,
    bon_rows=_best_anchor_rows(bond, rollout),
    metrics={'frac_penalized': jnp.mean(r_B < 0), **_anchor_metrics(bond, rollout)},
  )


def bond_targets(
  bond: BondConfig, model: ModelConfig, state: StateView, rollout: Rollout
) -> Targets:
  """BOND (section 4): (N - 1) r_BOND in nats, r_BOND ~ log p_le of y among anchor samples.

  Monte-Carlo quantiles (Eq. 10) from the first k anchor samples, optionally with the
  (B) correction of Eq. 8; or the learned quantile model (App. B.1), read before its own
  update (`quantile_update`), with the labels Z of that update.
  """
  rewards_BxK = rollout.anchor_reward_BxA[:, : bond.num_quantile_samples]
  targets = Targets(
    reward_B=jnp.zeros_like(rollout.policy_reward_B),
    logp_base_B=rollout.logp_anchor_B,
    bon_rows=_best_anchor_rows(bond, rollout),
    metrics=_anchor_metrics(bond, rollout),
  )
  if bond.quantile == 'mc':
    targets.metrics['log_quantile'] = jnp.mean(
      bon.mc_log_quantile(rollout.policy_reward_B, rewards_BxK)
    )
    return targets.replace(
      reward_B=(bond.n - 1) * mc_r_bond(bond, rollout.policy_reward_B, rewards_BxK)
    )

  logit_B = objectives.sg(qm.logits(model, state.quantile_params, *_rows_of(rollout.policy)))
  log_p_le_B = qm.log_quantile(logit_B)
  targets.metrics['log_quantile'] = jnp.mean(log_p_le_B)
  return targets.replace(
    reward_B=(bond.n - 1) * log_p_le_B,
    quantile_z_B=qm.targets(rollout.policy_reward_B, rollout.anchor_reward_BxA),
  )


def _rows_of(rows: Rows) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  return rows.prompt_BxP, rows.prompt_valid_BxP, rows.tokens_BxG, rows.mask_BxG


def quantile_update(
  bond: BondConfig, model: ModelConfig, state: StateView, rollout: Rollout, targets: Targets
) -> tuple[PyTree, PyTree, jax.Array]:
  """One Adam step of the learned quantile model on the BCE of Eq. 25 over this step's policy
  rows and labels: (new params, new optimizer state, the BCE before the step). The returns
  came from the parameters before it (`bond_targets`), so they do not depend on this step's
  labels, which are drawn from the same anchor samples as the Best-of-N sample."""

  def bce(quantile_params):
    return qm.bce_loss(
      qm.logits(model, quantile_params, *_rows_of(rollout.policy)), targets.quantile_z_B
    )

  loss, grads = jax.value_and_grad(bce)(state.quantile_params)
  tx = qm.optimizer(bond.quantile_learning_rate)
  updates, opt_state = tx.update(grads, state.quantile_opt_state, state.quantile_params)
  return optax.apply_updates(state.quantile_params, updates), opt_state, loss


def mc_r_bond(bond: BondConfig, reward_B: jax.Array, samples_BxK: jax.Array) -> jax.Array:
  """r_BOND (Eq. 8) from the Monte-Carlo quantiles of Eq. 10, with (B) if bond says so."""
  log_p_lt_B, log_p_le_B = bon.mc_log_quantiles(reward_B, samples_BxK)
  return bon.r_bond(log_p_lt_B, log_p_le_B, bond.n, with_correction=bond.bon_correction)


def reinforce_targets(
  bond: BondConfig, model: ModelConfig, state: StateView, rollout: Rollout
) -> Targets:
  """KL-regularised REINFORCE (Eq. 1): the reward itself, with pi_ref as the KL base."""
  del bond, model, state
  return Targets(reward_B=rollout.policy_reward_B, logp_base_B=rollout.logp_ref_B)


def _best_anchor_rows(bond: BondConfig, rollout: Rollout) -> Rows:
  return best_of(rollout.anchor, rollout.anchor_reward_BxA, bond.n)


def _anchor_metrics(bond: BondConfig, rollout: Rollout) -> dict[str, jax.Array]:
  rewards_BxA = rollout.anchor_reward_BxA
  return {
    'reward_anchor': jnp.mean(rewards_BxA),
    'reward_anchor_best': jnp.mean(jnp.max(rewards_BxA[:, : bond.n], axis=-1)),
  }


# ---------------------------------------------------------------------------
# Losses (their gradients, not their values, are the paper's; see objectives.py).


def jeffreys_loss(
  bond: BondConfig, targets: Targets, logp_B: jax.Array, logp_bon_B: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(1 - beta) forward KL + beta backward KL + gamma KL(pi || anchor) (Eq. 11, 13, 15, 19)."""
  advantage_B = objectives.backward_kl_advantage(
    targets.reward_B, logp_B, targets.logp_base_B, use_baseline=bond.use_baseline
  )
  terms = {
    'loss_fwd': objectives.forward_kl_loss(logp_bon_B),
    'loss_bwd': objectives.policy_gradient_loss(logp_B, advantage_B),
    'loss_reg': objectives.kl_regularizer_loss(logp_B, targets.logp_base_B),
  }
  total = (
    (1.0 - bond.beta) * terms['loss_fwd']
    + bond.beta * terms['loss_bwd']
    + bond.gamma * terms['loss_reg']
  )
  return total, terms


def reinforce_loss(
  bond: BondConfig, targets: Targets, logp_B: jax.Array, logp_bon_B: jax.Array | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Policy gradient of r - beta_RL KL(pi || pi_ref), leave-one-out within each prompt."""
  del logp_bon_B
  per_prompt = bond.num_policy_samples
  as_grid = lambda x: x.reshape(-1, per_prompt)
  advantage_BxM = objectives.reinforce_advantage(
    as_grid(targets.reward_B), as_grid(logp_B), as_grid(targets.logp_base_B), bond.beta_rl
  )
  loss = objectives.policy_gradient_loss(logp_B, advantage_BxM.reshape(-1))
  return loss, {'loss_pg': loss}


# ---------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Algorithm:
  samples: Callable[[BondConfig], tuple[int, int]]  # (policy, anchor) samples per prompt
  targets: Callable[[BondConfig, ModelConfig, StateView, Rollout], Targets]
  loss: Callable[
    [BondConfig, Targets, jax.Array, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]
  ]


def _bond_samples(bond: BondConfig) -> tuple[int, int]:
  # N samples for Best-of-N; k for the MC quantile, sharing the first ones; the learned
  # model needs only Eq. 25's y' (the Best-of-N samples serve).
  if bond.quantile == 'learned':
    return 1, bond.n
  return 1, max(bond.n, bond.num_quantile_samples)


REGISTRY: dict[str, Algorithm] = {
  'jbond': Algorithm(samples=lambda bond: (1, bond.n), targets=jbond_targets, loss=jeffreys_loss),
  'bond': Algorithm(samples=_bond_samples, targets=bond_targets, loss=jeffreys_loss),
  'reinforce': Algorithm(
    samples=lambda bond: (bond.num_policy_samples, 0),
    targets=reinforce_targets,
    loss=reinforce_loss,
  ),
}
