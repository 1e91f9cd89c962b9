"""The loss terms have the gradients ALGORITHMS.md (sections 4, 6, 7) says, checked exactly.

On the testbed (bond_jax/testbed.py: a real decoder over all 4^4 sequences of
2 prompts) every expectation is a sum. A surrogate's exact expected loss is
E_{y ~ sg(p)}[loss(y)] = sum_y sg(p(y)) loss(y), with p the distribution the
term samples from (the policy, or pi_BoN of the anchor); the tests call the
objectives' own functions on every y and compare jax.grad of that sum with
jax.grad of the exact divergence it stands for: float tolerance, no sampling.
Both are functions of the policy's exact log-probs log pi [P, Y]; their gradients
w.r.t. the policy's parameters go through the same compiled VJP of log pi (the
chain rule), so the decoder is differentiated once for all tests.

The last tests run the *real* `train.train_step` (SGD with step size 1, so the
update is minus the gradient estimate) on 4096 samples and compare with the
exact gradient of what that step optimises in expectation: statistical, with
tolerances set from the observed noise (cosine 0.992-0.9998 over seeds). The
same steps show that REINFORCE carries no anchor, and that a fixed anchor is pi_ref.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond_jax.algo import algorithms, bon
from bond_jax.algo import objectives as obj
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.state import init_state
from bond_jax.algo.step import StepConfig, make_train_step
from bond_jax.eval import testbed
from bond_jax.models import sampling
from bond_jax.types import parameter_free

sg = jax.lax.stop_gradient
TB, REF = testbed.make(seed=0, num_prompts=2)


def _perturb(params, scale, seed):
  """params + scale * std(leaf) * N(0, 1) noise, drawn with numpy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(x + scale * np.std(x) * rng.standard_normal(x.shape, np.float32)),
    params,
  )


# A policy and an anchor that differ from pi_ref and from each other (KL ~ 0.3 nats).
THETA = _perturb(REF, 0.3, seed=5)
ANCHOR = _perturb(REF, 0.3, seed=6)
_log_probs = jax.jit(TB.log_probs)
_sequence_logprobs = jax.jit(sampling.sequence_logprobs, static_argnums=0)
LOG_THETA = _log_probs(THETA)
LOG_REF = _log_probs(REF)
LOG_ANCHOR = _log_probs(ANCHOR)


@jax.jit
def _pullback(ct_PxY):
  """The gradient w.r.t. the policy's parameters (at THETA) of sum(ct * log pi): the chain
  rule's last factor, one compiled VJP of the exact log-probs shared by every test."""
  return jax.vjp(TB.log_probs, THETA)[1](ct_PxY)[0]


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _grad(f) -> np.ndarray:
  """jax.grad at THETA of f(TB.log_probs(params)), for f a function of the policy's exact
  log-probs [P, Y]: the gradient of f at LOG_THETA, pulled back to the parameters."""
  return _flat(_pullback(jax.grad(f)(LOG_THETA)))


def _assert_same_grad(f_surrogate, f_exact):
  g_s, g_e = _grad(f_surrogate), _grad(f_exact)
  assert np.linalg.norm(g_e) > 1e-2  # the test compares something non-trivial
  np.testing.assert_allclose(g_s, g_e, rtol=1e-4, atol=1e-5 * np.abs(g_e).max())


def _expect(p_PxY, loss_fn, *args_PxY):
  """sum_y sg(p(y)) loss(y), loss called on one row at a time, averaged over prompts."""
  per_row = jax.vmap(lambda *a: loss_fn(*(x[None] for x in a)))
  losses = per_row(*(x.reshape(-1) for x in args_PxY)).reshape(p_PxY.shape)
  return jnp.mean(jnp.sum(sg(p_PxY) * losses, axis=-1))


def _anchor_log_probs(kind, log_pi):
  """The anchor's log-probs: fixed pi_ref, or the policy itself under stop_gradient."""
  return LOG_REF if kind == 'ref' else sg(log_pi)


@pytest.mark.parametrize('anchor', ['ref', 'self'])
@pytest.mark.parametrize('n', [2, 8])
def test_forward_kl_surrogate_is_grad_of_kl_bon_to_pi(anchor, n):
  """Eq. 13: grad E_{y ~ pi_BoN}[-log pi(y)] = grad KL(pi_BoN || pi)."""

  def surrogate(log_pi):
    log_bon = TB.log_pi_bon(_anchor_log_probs(anchor, log_pi), n)
    return _expect(jnp.exp(log_bon), obj.forward_kl_loss, log_pi)

  def exact(log_pi):
    log_bon = sg(TB.log_pi_bon(_anchor_log_probs(anchor, log_pi), n))
    return jnp.mean(testbed.kl(log_bon, log_pi))

  _assert_same_grad(surrogate, exact)


@pytest.mark.parametrize('anchor', ['ref', 'self'])
@pytest.mark.parametrize('n', [2, 4, 8])
def test_backward_kl_surrogate_is_grad_of_kl_pi_to_bon(anchor, n):
  """Eq. 15: advantage (N-1) r_BOND - (log pi - log pi_anchor), r_BOND with the (B) term.

  No baseline here: the identity is exact only for the plain advantage (the
  baseline's contribution is zero in expectation, see the pair test below).
  """

  def surrogate(log_pi):
    log_anchor = _anchor_log_probs(anchor, log_pi)
    r_bond = bon.r_bond(*TB.log_quantiles(log_anchor), n, with_correction=True)
    adv = obj.backward_kl_advantage(
      r_bond.reshape(-1), log_pi.reshape(-1), log_anchor.reshape(-1), n - 1.0, use_baseline=False
    )
    return _expect(jnp.exp(log_pi), obj.policy_gradient_loss, log_pi, adv.reshape(log_pi.shape))

  def exact(log_pi):
    return jnp.mean(testbed.kl(log_pi, sg(TB.log_pi_bon(_anchor_log_probs(anchor, log_pi), n))))

  _assert_same_grad(surrogate, exact)


def test_backward_kl_batch_baseline_is_unbiased_over_pairs():
  """With B = 2 rows, each baseline is the other row's return: exact over all (y1, y2) pairs."""
  n = 4
  log_p_lt, log_p_le = TB.log_quantiles(LOG_REF)
  r_bond_PxY = bon.r_bond(log_p_lt, log_p_le, n, with_correction=True)

  def surrogate(log_pi):
    pair = lambda a: jnp.stack(jnp.broadcast_arrays(a[:, :, None], a[:, None, :]), -1)
    lp, lr, r = pair(log_pi), pair(LOG_REF), pair(r_bond_PxY)  # [P, Y, Y, 2]
    weight = sg(jnp.exp(lp.sum(-1)))

    def loss(lp_2, lr_2, r_2):
      adv_2 = obj.backward_kl_advantage(r_2, lp_2, lr_2, n - 1.0, use_baseline=True)
      return obj.policy_gradient_loss(lp_2, adv_2)

    losses = jax.vmap(loss)(lp.reshape(-1, 2), lr.reshape(-1, 2), r.reshape(-1, 2))
    return jnp.mean(jnp.sum(weight * losses.reshape(weight.shape), axis=(1, 2)))

  def exact(log_pi):
    return jnp.mean(testbed.kl(log_pi, TB.log_pi_bon(LOG_REF, n)))

  _assert_same_grad(surrogate, exact)


def test_kl_regularizer_surrogate_is_grad_of_kl_pi_to_anchor():
  """Eq. 19 (section 6 step 4): grad E_pi[sg(log pi - log pi_anchor) log pi]
  = grad KL(pi || pi_anchor)."""

  def surrogate(log_pi):
    return _expect(jnp.exp(log_pi), obj.kl_regularizer_loss, log_pi, LOG_ANCHOR)

  _assert_same_grad(surrogate, lambda log_pi: jnp.mean(testbed.kl(log_pi, LOG_ANCHOR)))


@pytest.mark.parametrize('n_anchor', [2, 3])
def test_jbond_backward_surrogate_is_grad_of_tilted_kl(n_anchor):
  """Section 6 step 3: with E[r_J] = alpha_n (1 - p_le)^n over the anchors, the J-BOND
  backward surrogate is grad KL(pi || pi_anchor exp(E[r_J]) / Z): the normaliser Z
  does not depend on pi, so it drops out."""
  _, log_p_le = TB.log_quantiles(LOG_ANCHOR)
  r_j = bon.expected_jbond_reward(jnp.exp(log_p_le), n_anchor)

  def surrogate(log_pi):
    adv = obj.backward_kl_advantage(
      r_j.reshape(-1), log_pi.reshape(-1), LOG_ANCHOR.reshape(-1), 1.0, use_baseline=False
    )
    return _expect(jnp.exp(log_pi), obj.policy_gradient_loss, log_pi, adv.reshape(log_pi.shape))

  def exact(log_pi):
    tilted = LOG_ANCHOR + r_j
    tilted = tilted - jax.nn.logsumexp(tilted, axis=-1, keepdims=True)
    return jnp.mean(testbed.kl(log_pi, tilted))

  _assert_same_grad(surrogate, exact)


def test_reinforce_surrogate_is_grad_of_kl_regularised_reward():
  """Eq. 1 with two samples and the leave-one-out baseline, exact over all pairs:
  the gradient of -(E_pi[r] - beta_RL KL(pi || pi_ref))."""
  beta_rl = 0.1
  reward_PxY = jnp.asarray(TB.reward_PxY)

  def surrogate(log_pi):
    pair = lambda a: jnp.stack(jnp.broadcast_arrays(a[:, :, None], a[:, None, :]), -1)
    lp, lr, r = pair(log_pi), pair(LOG_REF), pair(reward_PxY)  # [P, Y, Y, 2]
    weight = sg(jnp.exp(lp.sum(-1)))

    def loss(r_2, lp_2, lr_2):
      adv = obj.reinforce_advantage(r_2[None], lp_2[None], lr_2[None], beta_rl)
      return obj.policy_gradient_loss(lp_2, adv[0])

    losses = jax.vmap(loss)(r.reshape(-1, 2), lp.reshape(-1, 2), lr.reshape(-1, 2))
    return jnp.mean(jnp.sum(weight * losses.reshape(weight.shape), axis=(1, 2)))

  def exact(log_pi):
    reward = jnp.sum(jnp.exp(log_pi) * reward_PxY, axis=-1)
    return -jnp.mean(reward - beta_rl * testbed.kl(log_pi, LOG_REF))

  _assert_same_grad(surrogate, exact)


# ---------------------------------------------------------------------------
# The real train step: its update is an unbiased estimate of the exact gradient.


def _expected_mc_r_bond(cfg: StepConfig, p_lt, p_le):
  """E[the step's MC r_BOND estimate] of every y, exactly: the k anchor samples fall below
  y, on y itself, or above it with probabilities (p_lt, pi_ref(y), 1 - p_le), so the
  counts are multinomial; the step's own estimator is evaluated on every count pattern."""
  k = cfg.bond.num_quantile_samples
  below_C, equal_C = map(
    np.array, zip(*[(a, e) for a in range(k + 1) for e in range(k + 1 - a)], strict=True)
  )
  j_K = np.arange(k)
  anchors_CxK = np.where(
    j_K < below_C[:, None], -1.0, np.where(j_K < (below_C + equal_C)[:, None], 0.0, 1.0)
  )
  r_C = algorithms.mc_r_bond(
    cfg.bond, jnp.zeros(len(below_C)), jnp.asarray(anchors_CxK, jnp.float32)
  )
  above_C = k - below_C - equal_C
  log_multinomial_C = jnp.asarray(
    [
      jax.scipy.special.gammaln(k + 1.0)
      - sum(jax.scipy.special.gammaln(x + 1.0) for x in (a, e, k - a - e))
      for a, e in zip(below_C, equal_C, strict=True)
    ]
  )
  xlogy = jax.scipy.special.xlogy
  log_pmf_PxYxC = (
    log_multinomial_C
    + xlogy(below_C, p_lt[..., None])
    + xlogy(equal_C, (p_le - p_lt)[..., None])
    + xlogy(above_C, (1.0 - p_le)[..., None])
  )
  return jnp.sum(jnp.exp(log_pmf_PxYxC) * r_C, axis=-1)


def _expected_objective(cfg: StepConfig):
  """What train_step descends in expectation, with the anchor fixed at pi_ref."""
  log_p_lt, log_p_le = TB.log_quantiles(LOG_REF)
  p_le = jnp.exp(log_p_le)
  reward_PxY = jnp.asarray(TB.reward_PxY)

  def objective(log_pi):
    kl_ref = testbed.kl(log_pi, LOG_REF)
    if cfg.bond.algorithm == 'reinforce':
      return -jnp.mean(jnp.sum(jnp.exp(log_pi) * reward_PxY, -1) - cfg.bond.beta_rl * kl_ref)
    if cfg.bond.algorithm == 'bond' and cfg.bond.bon_correction:
      r = (cfg.bond.n - 1) * _expected_mc_r_bond(cfg, jnp.exp(log_p_lt), p_le)
    elif cfg.bond.algorithm == 'bond':  # MC quantiles: E[log p_hat] is the reward actually followed
      r = (cfg.bond.n - 1) * bon.mc_log_quantile_expectation(p_le, cfg.bond.num_quantile_samples)
    else:
      r = bon.expected_jbond_reward(p_le, cfg.bond.n)
    bwd = kl_ref - jnp.sum(jnp.exp(log_pi) * r, -1)
    fwd = testbed.kl(TB.log_pi_bon(LOG_REF, cfg.bond.n), log_pi)
    return jnp.mean((1 - cfg.bond.beta) * fwd + cfg.bond.beta * bwd + cfg.bond.gamma * kl_ref)

  return objective


def test_mc_r_bond_with_correction_pins_the_estimator():
  """r_BOND = log p_le + log (B) / (N-1) (Eq. 8) from p_le = (1 + #<=)/(k+1) and
  p_lt = (1 + #<)/(k+1): y counts among the samples for both, so a level that no sample
  ties has p_lt = p_le and (B) = N (the continuous limit)."""
  n, k = 4, 4
  cfg = StepConfig(
    model=TB.cfg,
    sampling=TB.sampling_params(),
    reward_fn=parameter_free(TB.reward_fn),
    bond=BondConfig(algorithm='bond', n=n, num_quantile_samples=k, bon_correction=True),
  )
  anchors = jnp.array([[-1.0, 0.0, 0.0, 1.0], [-1.0, -2.0, 1.0, 1.0]])
  got = algorithms.mc_r_bond(cfg.bond, jnp.zeros(2), anchors)
  for row, (p_le, p_lt) in enumerate([(4 / 5, 2 / 5), (3 / 5, 3 / 5)]):
    b = sum((p_lt / p_le) ** i for i in range(n))
    assert float(got[row]) == pytest.approx(np.log(p_le) + np.log(b) / (n - 1), rel=1e-5)


STEP_SEED = 0  # of the state's RNG before the step


@functools.cache
def _one_step_on_4096_prompts(**knobs):
  """(cfg, new_state, metrics) of one real step with SGD of step size 1 (update = minus the
  gradient estimate) from the policy THETA, the anchor fixed at pi_ref unless `knobs` says
  otherwise. Cached: each configuration compiles and runs once for the tests that read it."""
  cfg = StepConfig(
    model=TB.cfg,
    sampling=TB.sampling_params(),
    reward_fn=parameter_free(TB.reward_fn),
    bond=BondConfig(**{'anchor': 'fixed', **knobs}),
  )
  tx = optax.sgd(1.0)
  state = init_state(cfg.bond, THETA, REF, tx, jax.random.PRNGKey(STEP_SEED))  # (donated)
  new_state, metrics = make_train_step(cfg, tx, optax.constant_schedule(1.0))(
    state, *TB.prompts(4096)
  )
  return cfg, new_state, metrics


# REINFORCE with anchor='ema' set: it has no anchor whatever the anchor field says.
REINFORCE = dict(algorithm='reinforce', beta_rl=0.1, anchor='ema')
JBOND = dict(algorithm='jbond', n=2, beta=0.5, gamma=1.0)  # anchor fixed at pi_ref


@pytest.mark.parametrize(
  'knobs',
  [
    dict(algorithm='bond', n=4, beta=0.0),  # forward KL only: SFT on Best-of-4 of the anchor
    dict(algorithm='bond', n=4, beta=1.0, num_quantile_samples=16),  # backward, MC r_BOND
    # With (B): unbiased too. (Here (B) is nearly constant across y, so its expected
    # gradient is within 2% of the uncorrected one; the estimator is pinned above.)
    dict(algorithm='bond', n=4, beta=1.0, num_quantile_samples=8, bon_correction=True),
    JBOND,
    REINFORCE,
  ],
  ids=lambda k: '-'.join(f'{v}' for v in k.values()),
)
def test_train_step_update_is_unbiased(knobs):
  cfg, new_state, _ = _one_step_on_4096_prompts(**knobs)
  g_hat = _flat(THETA) - _flat(new_state.params)
  g = _grad(_expected_objective(cfg))
  cos = g @ g_hat / np.linalg.norm(g) / np.linalg.norm(g_hat)
  proj = g @ g_hat / (g @ g)
  # Observed over seeds at 4096 samples: cos >= 0.992, proj within 1 +- 0.05. A wrong
  # sign, scale (e.g. dropping N - 1) or estimator moves these far outside.
  assert cos > 0.98, f'cosine {cos:.4f} between the step and the exact gradient'
  assert 0.9 < proj < 1.1, f'projection {proj:.4f} of the step on the exact gradient'


def test_reinforce_carries_no_anchor():
  """REINFORCE has no anchor: no copy in the state or its checkpoints, no kl_anchor metric."""
  _, state, metrics = _one_step_on_4096_prompts(**REINFORCE)
  assert state.anchor_params is None
  assert 'kl_anchor' not in metrics and 'reward_anchor' not in metrics
  assert {'loss_pg', 'kl_ref', 'reward_policy'} <= set(metrics)


def test_fixed_anchor_is_pi_ref_and_carries_no_copy():
  """A fixed anchor is pi_ref: the state holds no anchor tree, the KL to the anchor is the
  KL to pi_ref (reported once, as kl_ref), and the step draws anchor samples from pi_ref.
  Read from J-BOND's step above (anchor='fixed', gamma = 1)."""
  cfg, new_state, m = _one_step_on_4096_prompts(**JBOND)
  rng = jax.random.PRNGKey(STEP_SEED)
  assert init_state(cfg.bond, THETA, REF, optax.sgd(1.0), rng).anchor_params is None
  assert new_state.anchor_params is None and 'kl_anchor' not in m
  # The loss's regulariser is KL(pi || pi_ref): recompute it from the policy samples.
  _, k_pol, _ = jax.random.split(rng, 3)
  prompt, valid = TB.prompts(4096)
  pol = sampling.sample_jit(TB.cfg, THETA, prompt, valid, k_pol, cfg.sampling)
  logp = lambda params: np.asarray(
    _sequence_logprobs(TB.cfg, params, prompt, valid, pol.tokens_BxG, pol.mask_BxG).sum(-1)
  )
  lp, lp_ref = logp(THETA), logp(REF)
  np.testing.assert_allclose(m['loss_reg'], ((lp - lp_ref) * lp).mean(), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(m['kl_ref'], (lp - lp_ref).mean(), rtol=2e-4, atol=2e-4)
