"""J-BOND: loss terms by hand, signs, the full train step against an independent recompute,
the EMA anchor against its closed form, and no gradient into the anchor or the reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.algo import objectives as obj
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.state import init_state, make_optimizer
from bond_jax.algo.step import StepConfig, train_step
from bond_jax.data import tasks as tasks_lib
from bond_jax.models import sampling
from bond_jax.types import parameter_free

LOG16 = math.log(16.0)


def test_jbond_terms_match_a_hand_computed_example():
  """Three prompts worked through ALGORITHMS.md section 6 on paper."""
  logp = jnp.array([-2.0, -3.0, -1.5])  # log pi(y) of the policy samples
  logp_anchor = jnp.array([-2.5, -2.0, -1.5])  # log pi_anchor(y) of the same samples
  logp_bon = jnp.array([-4.0, -1.0, -2.0])  # log pi of the better anchor sample
  reward = jnp.array([0.3, 0.1, 0.9])
  anchor_reward = jnp.array([[0.5, 0.2], [0.4, 0.6], [0.9, 0.1]])

  from bond_jax.algo import bon

  r_j = bon.jbond_reward(reward, anchor_reward, 2)
  # Only prompt 1 is worse than both anchors (0.1 < 0.4 and 0.1 < 0.6).
  np.testing.assert_allclose(r_j, [0.0, -LOG16, 0.0], atol=1e-6)
  # Return R = r_J - (log pi - log pi_anchor) = [-0.5, -log16 + 1, 0].
  # Leave-one-out baselines: [(R1 + R2)/2, (R0 + R2)/2, (R0 + R1)/2].
  r0, r1, r2 = -0.5, -LOG16 + 1.0, 0.0
  adv = [r0 - (r1 + r2) / 2, r1 - (r0 + r2) / 2, r2 - (r0 + r1) / 2]
  np.testing.assert_allclose(obj.backward_kl_advantage(r_j, logp, logp_anchor), adv, rtol=1e-6)
  loss_bwd = -(adv[0] * -2.0 + adv[1] * -3.0 + adv[2] * -1.5) / 3
  np.testing.assert_allclose(obj.policy_gradient_loss(logp, jnp.array(adv)), loss_bwd, rtol=1e-6)
  np.testing.assert_allclose(obj.forward_kl_loss(logp_bon), 7.0 / 3, rtol=1e-6)
  # sg(log pi - log pi_anchor) * log pi = [0.5 * -2, -1 * -3, 0 * -1.5] -> mean 2/3.
  np.testing.assert_allclose(obj.kl_regularizer_loss(logp, logp_anchor), 2.0 / 3, rtol=1e-6)
  np.testing.assert_allclose(obj.best_of(anchor_reward), [0, 1, 0])
  np.testing.assert_array_equal(obj.best_of(jnp.array([[1.0, 1.0]])), [0])  # ties: lowest index

  # Signs: descending each term moves each log-likelihood the intended way.
  g_fwd = jax.grad(obj.forward_kl_loss)(logp_bon)
  assert (g_fwd < 0).all()  # raise log pi(y_best): supervised learning on Best-of-2
  g_bwd = jax.grad(
    lambda lp: obj.policy_gradient_loss(lp, obj.backward_kl_advantage(r_j, lp, logp_anchor))
  )(logp)
  np.testing.assert_allclose(g_bwd, -np.array(adv) / 3, rtol=1e-6)  # advantage held constant
  assert g_bwd[1] > 0 and g_bwd[2] < 0  # the penalised sample is pushed down, the other up
  g_reg = jax.grad(lambda lp: obj.kl_regularizer_loss(lp, logp_anchor))(logp)
  # pi is above the anchor on sample 0 and below it on sample 1: descend pulls both back.
  assert g_reg[0] > 0 and g_reg[1] < 0 and g_reg[2] == 0


def test_descending_gamma_term_lowers_kl_to_anchor():
  """Exact expectation over a categorical: E_{y~sg(pi)}[loss_reg] has grad KL(pi || anchor)."""
  theta = jnp.array([0.3, -1.0, 2.0, 0.5, -0.2])
  log_anchor = jax.nn.log_softmax(jnp.array([1.0, 0.0, -1.0, 0.2, 0.4]))

  def kl(t):
    logp = jax.nn.log_softmax(t)
    return jnp.sum(jnp.exp(logp) * (logp - log_anchor))

  def surrogate(t):
    logp = jax.nn.log_softmax(t)
    weights = jax.lax.stop_gradient(jnp.exp(logp))  # expectation under the sampling policy
    return jnp.sum(weights * jax.lax.stop_gradient(logp - log_anchor) * logp)

  np.testing.assert_allclose(jax.grad(surrogate)(theta), jax.grad(kl)(theta), rtol=1e-5, atol=1e-7)
  stepped = theta - 0.1 * jax.grad(surrogate)(theta)
  assert kl(stepped) < kl(theta)


def _token_sum_reward(prompt, valid, response, mask):
  """A reward with many distinct values even for a random policy (unlike copy accuracy)."""
  del prompt, valid
  return jnp.sum(jnp.where(mask, response, 0), axis=-1).astype(jnp.float32)


ETA = 0.2  # EMA rate of the shared J-BOND setup below

# Module-level jits with static model / sampler, so the recomputes below compile once
# and are shared by every test that draws or scores samples of the same shapes.
_sample = sampling.sample_jit
_sequence_logprobs = jax.jit(sampling.sequence_logprobs, static_argnums=0)


def _perturbed(tree, scale, seed):
  """tree + scale * N(0, 1) noise, drawn with numpy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32)), tree
  )


def _setup(
  tiny_cfg,
  tiny_params,
  copy_task,
  *,
  eta=ETA,
  anchor='ema',
  period=0,
  beta=0.5,
  gamma=0.25,
  lr=1e-2,
):
  sp = sampling.SamplingParams(
    max_new_tokens=copy_task.response_len + 1, eos_id=tasks_lib.EOS, pad_id=tasks_lib.PAD
  )
  step_cfg = StepConfig(
    model=tiny_cfg,
    sampling=sp,
    reward_fn=parameter_free(_token_sum_reward),
    bond=BondConfig(beta=beta, gamma=gamma, eta=eta, anchor=anchor, anchor_period=period),
  )
  tx, schedule = make_optimizer(lr, warmup_steps=0)
  state = init_state(step_cfg.bond, tiny_params, tiny_params, tx, jax.random.PRNGKey(4))
  # Make policy, anchor and reference all different, so every term is non-trivial.
  state = state.replace(params=_perturbed(tiny_params, 0.3, seed=5))
  if state.anchor_params is not None:
    state = state.replace(anchor_params=_perturbed(tiny_params, 0.3, seed=6))
  prompt, valid = copy_task.prompts(jax.random.PRNGKey(7), 16)
  return step_cfg, tx, schedule, state, prompt, valid


def _jit_step(step_cfg, tx, schedule):
  """The real step, jitted (not donated: tests reuse the state they pass in)."""
  return jax.jit(functools.partial(train_step, cfg=step_cfg, tx=tx, schedule=schedule))


@pytest.fixture(scope='module')
def jbond(tiny_cfg, tiny_params, copy_task):
  """J-BOND with an EMA anchor (eta = ETA, beta = 0.5, gamma = 0.25) and its step, compiled
  once for the tests that run it."""
  step_cfg, tx, schedule, state, prompt, valid = _setup(tiny_cfg, tiny_params, copy_task)
  return step_cfg, tx, schedule, state, prompt, valid, _jit_step(step_cfg, tx, schedule)


def _seq_logp(cfg, params, prompt, valid, tokens, mask):
  return np.asarray(
    _sequence_logprobs(cfg, params, prompt, valid, jnp.asarray(tokens), jnp.asarray(mask)).sum(-1)
  )


def test_train_step_matches_independent_recompute(tiny_cfg, jbond):
  step_cfg, _, _, state, prompt, valid, step = jbond
  new_state, m = step(state, prompt, valid)

  # Redraw the same samples (same keys) and rebuild every quantity with numpy.
  _, k_pol, k_anc = jax.random.split(state.rng, 3)
  sp, b = step_cfg.sampling, prompt.shape[0]
  pol = _sample(tiny_cfg, state.params, prompt, valid, k_pol, sp)
  anc = _sample(tiny_cfg, state.anchor_params, prompt, valid, k_anc, sp, num_samples=2)
  rep = lambda x: jnp.repeat(x, 2, axis=0)
  r = np.asarray(_token_sum_reward(prompt, valid, pol.tokens_BxG, pol.mask_BxG))
  ra = np.asarray(_token_sum_reward(rep(prompt), rep(valid), anc.tokens_BxG, anc.mask_BxG)).reshape(
    b, 2
  )
  best = np.where(ra[:, 1] > ra[:, 0], 1, 0)  # ties -> first sample
  anc_tokens = np.asarray(anc.tokens_BxG).reshape(b, 2, -1)[np.arange(b), best]
  anc_mask = np.asarray(anc.mask_BxG).reshape(b, 2, -1)[np.arange(b), best]

  seq_logp = functools.partial(_seq_logp, tiny_cfg, prompt=prompt, valid=valid)
  lp = seq_logp(state.params, tokens=pol.tokens_BxG, mask=pol.mask_BxG)
  lp_anchor = seq_logp(state.anchor_params, tokens=pol.tokens_BxG, mask=pol.mask_BxG)
  lp_ref = seq_logp(state.ref_params, tokens=pol.tokens_BxG, mask=pol.mask_BxG)
  lp_bon = seq_logp(state.params, tokens=anc_tokens, mask=anc_mask)
  r_j = np.where(r < ra.min(axis=1), -LOG16, 0.0)
  ret = r_j - (lp - lp_anchor)
  adv = ret - (ret.sum() - ret) / (b - 1)
  want = {
    'loss_fwd': -lp_bon.mean(),
    'loss_bwd': -(adv * lp).mean(),
    'loss_reg': ((lp - lp_anchor) * lp).mean(),
    'frac_penalized': (r_j < 0).mean(),
    'reward_policy': r.mean(),
    'reward_anchor': ra.mean(),
    'kl_ref': (lp - lp_ref).mean(),
    'kl_anchor': (lp - lp_anchor).mean(),
  }
  want['loss'] = 0.5 * want['loss_fwd'] + 0.5 * want['loss_bwd'] + 0.25 * want['loss_reg']
  assert 0 < want['frac_penalized'] < 1, 'example should mix penalised and unpenalised samples'
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=2e-4, atol=2e-4, err_msg=k)

  # EMA anchor: theta_anchor' = (1 - eta) theta_anchor + eta theta' (Eq. 18).
  jax.tree.map(
    lambda a0, p1, a1: np.testing.assert_allclose(
      a1, (1 - ETA) * a0 + ETA * p1, rtol=1e-5, atol=1e-6
    ),
    state.anchor_params,
    new_state.params,
    new_state.anchor_params,
  )
  # The reference never moves.
  jax.tree.map(np.testing.assert_array_equal, new_state.ref_params, state.ref_params)
  assert int(new_state.step) == 1


def test_ema_anchor_over_steps_equals_closed_form(jbond):
  eta = ETA
  *_, state, prompt, valid, step = jbond
  anchor0 = state.anchor_params
  thetas = []
  for _ in range(3):
    state, _ = step(state, prompt, valid)
    thetas.append(state.params)
  # anchor_3 = (1-eta)^3 anchor_0 + sum_j eta (1-eta)^(3-j) theta_j
  want = jax.tree.map(
    lambda a0, t1, t2, t3: (
      (1 - eta) ** 3 * a0 + eta * (1 - eta) ** 2 * t1 + eta * (1 - eta) * t2 + eta * t3
    ),
    anchor0,
    *thetas,
  )
  jax.tree.map(
    lambda w, a: np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6), want, state.anchor_params
  )


def test_periodic_anchor_is_a_copy_every_period(tiny_cfg, tiny_params, copy_task):
  step_cfg, tx, schedule, state, prompt, valid = _setup(
    tiny_cfg, tiny_params, copy_task, anchor='periodic', period=2
  )
  step = _jit_step(step_cfg, tx, schedule)
  anchor0 = state.anchor_params
  s1, _ = step(state, prompt, valid)
  jax.tree.map(np.testing.assert_array_equal, s1.anchor_params, anchor0)  # not yet
  s2, _ = step(s1, prompt, valid)
  # anchor <- policy. The compiled step may compute the new parameters once for each of its
  # two outputs, and at the suite's LLVM level 0 (tests/conftest.py) the two round apart by
  # up to 6e-8 here; a missed copy is off by Adam steps (lr 1e-2 here).
  check = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)
  jax.tree.map(check, s2.anchor_params, s2.params)
  assert not np.allclose(s2.anchor_params['final_norm']['scale'], anchor0['final_norm']['scale'])


def test_no_gradient_reaches_anchor_or_reference(jbond):
  step_cfg, tx, schedule, state, prompt, valid, _ = jbond
  fields = ('anchor_params', 'ref_params', 'params')

  def loss(trees):
    _, m = train_step(
      state.replace(**dict(zip(fields, trees, strict=True))),
      prompt,
      valid,
      cfg=step_cfg,
      tx=tx,
      schedule=schedule,
    )
    return m['loss']

  # Forward-mode (the sampler's while_loop has no reverse mode): a random direction in the
  # anchor's or the reference's parameters must not move the loss at all. One compiled
  # jvp, called once per tree with a random tangent there and zeros elsewhere.
  derivative = jax.jit(lambda trees, tangents: jax.jvp(loss, (trees,), (tangents,))[1])

  trees = [getattr(state, f) for f in fields]
  zeros = [jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), t) for t in trees]
  d_anchor, d_ref, d_params = (
    derivative(trees, [_perturbed(z, 1.0, seed=i) if j == i else z for j, z in enumerate(zeros)])
    for i in range(len(fields))
  )
  assert float(d_anchor) == 0.0 and float(d_ref) == 0.0
  assert abs(float(d_params)) > 1e-3  # control: the policy does get a gradient
  # The optimizer holds state (Adam's two moments) for the policy only.
  n_param_leaves = len(jax.tree.leaves(state.params))
  n_opt_arrays = sum(x.ndim > 0 for x in jax.tree.leaves(state.opt_state))
  assert n_opt_arrays == 2 * n_param_leaves
