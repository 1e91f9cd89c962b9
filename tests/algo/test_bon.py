"""Tests of bond_jax.bon against independent truths (brute force, float64 references).

The jax code runs in float32; references are numpy float64 or Python's math.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.algo import bon
from bond_jax.eval import testbed

# Five outcomes with tied rewards (indices 1, 3 and 2, 4), so the index tie rule matters.
TIED_REWARD = np.array([0.3, -1.0, 2.0, -1.0, 2.0])


def _random_pi(rng: np.random.Generator, size: int) -> np.ndarray:
  pi = rng.dirichlet(np.ones(size))
  return pi / pi.sum()


def _ref_quantiles(pi: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 p_lt / p_le straight from the definition, order = (reward, index)."""
  keys = list(zip(reward.tolist(), range(len(reward)), strict=True))
  idx = range(len(pi))
  p_lt = np.array([sum(pi[j] for j in idx if keys[j] < keys[i]) for i in idx])
  return p_lt, p_lt + pi


def _brute_force_bon(pi: np.ndarray, reward: np.ndarray, n: int) -> np.ndarray:
  """Enumerate all n-tuples of draws and keep the best by (reward, index)."""
  out = np.zeros_like(pi)
  for draws in itertools.product(range(len(pi)), repeat=n):
    best = max(draws, key=lambda i: (reward[i], i))
    out[best] += np.prod(pi[list(draws)])
  return out


def _jax_log_quantiles(pi: np.ndarray, reward: np.ndarray):
  return bon.log_quantiles(jnp.log(jnp.asarray(pi, jnp.float32)), jnp.asarray(reward))


@pytest.mark.parametrize('seed', [0, 1])
def test_quantiles_match_definition_with_index_tie_rule(seed):
  pi = _random_pi(np.random.default_rng(seed), 5)
  p_lt_ref, p_le_ref = _ref_quantiles(pi, TIED_REWARD)
  p_lt, p_le = bon.quantiles(jnp.asarray(pi, jnp.float32), jnp.asarray(TIED_REWARD))
  np.testing.assert_allclose(p_lt, p_lt_ref, atol=1e-6)
  np.testing.assert_allclose(p_le, p_le_ref, atol=1e-6)
  log_p_lt, log_p_le = _jax_log_quantiles(pi, TIED_REWARD)
  np.testing.assert_allclose(np.exp(log_p_lt), p_lt_ref, atol=1e-6)
  np.testing.assert_allclose(np.exp(log_p_le), p_le_ref, atol=1e-6)
  # Lower index counts as worse among equal rewards; the worst has p_lt = 0 exactly.
  assert p_le_ref[1] <= p_lt_ref[3] + 1e-12 and p_le_ref[2] <= p_lt_ref[4] + 1e-12
  assert log_p_lt[1] == -np.inf and log_p_le[4] == 0.0


def test_log_quantiles_batch_axes():
  rng = np.random.default_rng(3)
  pi_BxY = np.stack([_random_pi(rng, 5) for _ in range(6)]).reshape(2, 3, 5)
  reward_BxY = rng.integers(0, 3, size=(2, 3, 5)).astype(np.float32)
  lt, le = bon.log_quantiles(jnp.log(jnp.asarray(pi_BxY, jnp.float32)), jnp.asarray(reward_BxY))
  for a, b in itertools.product(range(2), range(3)):
    p_lt_ref, p_le_ref = _ref_quantiles(pi_BxY[a, b], reward_BxY[a, b])
    np.testing.assert_allclose(np.exp(lt[a, b]), p_lt_ref, atol=1e-6)
    np.testing.assert_allclose(np.exp(le[a, b]), p_le_ref, atol=1e-6)


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5])
def test_pi_bon_matches_brute_force_and_theorem1(n):
  pi = _random_pi(np.random.default_rng(10 + n), 5)
  truth = _brute_force_bon(pi, TIED_REWARD, n)
  log_p_lt, log_p_le = _jax_log_quantiles(pi, TIED_REWARD)
  closed = bon.log_pi_bon(log_p_lt, log_p_le, n)
  thm1 = bon.log_pi_bon_theorem1(jnp.log(jnp.asarray(pi, jnp.float32)), log_p_lt, log_p_le, n)
  np.testing.assert_allclose(np.exp(closed), truth, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(thm1), truth, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize('n', [1, 2, 7, 64, 1024])
def test_pi_bon_normalised_worst_and_correction_range(n):
  pi = _random_pi(np.random.default_rng(n), 6)
  reward = np.arange(6.0)[::-1].copy()  # outcome 5 is the worst
  log_pi = jnp.log(jnp.asarray(pi, jnp.float32))
  log_p_lt, log_p_le = bon.log_quantiles(log_pi, jnp.asarray(reward))
  for log_bon in (
    bon.log_pi_bon(log_p_lt, log_p_le, n),
    bon.log_pi_bon_theorem1(log_pi, log_p_lt, log_p_le, n),
  ):
    assert np.all(np.isfinite(log_bon))
    np.testing.assert_allclose(np.exp(log_bon).sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(log_bon[5], n * math.log(pi[5]), rtol=1e-5)
  log_b = bon.log_correction_b(log_p_lt, log_p_le, n)
  assert log_b[5] == 0.0  # (B) = 1 for the worst outcome
  assert np.all(log_b >= -1e-6) and np.all(log_b <= math.log(n) + 1e-5)


@pytest.mark.parametrize('n', [2, 5, 1024])
def test_log_correction_b_against_float64(n):
  log_q = [-math.inf, -30.0, -1.0, -1e-2, -1e-4, -5e-7, -1e-12, 0.0]
  ref = [
    0.0
    if lq == -math.inf
    else math.log(n)
    if lq == 0.0
    else math.log(-math.expm1(n * lq)) - math.log(-math.expm1(lq))
    for lq in log_q
  ]
  log_p_le = jnp.zeros(len(log_q), jnp.float32)  # so that log_p_lt = log_q exactly
  out = bon.log_correction_b(log_p_le + jnp.asarray(log_q, jnp.float32), log_p_le, n)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(('n', 'm'), [(2, 3), (3, 2), (4, 2)])
def test_iterated_bon_equals_bon_of_power(n, m):
  pi = _random_pi(np.random.default_rng(7), 5)
  reward = jnp.asarray(TIED_REWARD)
  log_pi = jnp.log(jnp.asarray(pi, jnp.float32))
  iterated = log_pi
  for _ in range(m):
    iterated = bon.log_pi_bon(*bon.log_quantiles(iterated, reward), n)
  direct = bon.log_pi_bon(*bon.log_quantiles(log_pi, reward), n**m)
  np.testing.assert_allclose(np.exp(iterated), np.exp(direct), rtol=1e-4, atol=1e-7)


def test_r_bond_reproduces_pi_bon():
  pi = _random_pi(np.random.default_rng(5), 6)
  log_pi = jnp.log(jnp.asarray(pi, jnp.float32))
  reward = np.array([0.1, 0.5, -2.0, 3.0, 0.7, 1.1])
  log_p_lt, log_p_le = bon.log_quantiles(log_pi, jnp.asarray(reward))
  for n in (2, 4, 16):
    r = bon.r_bond(log_p_lt, log_p_le, n, with_correction=True)
    np.testing.assert_allclose(
      log_pi + r / bon.beta_bond(n), bon.log_pi_bon(log_p_lt, log_p_le, n), rtol=1e-5, atol=1e-5
    )
    assert bon.beta_bond(n) == pytest.approx(1.0 / (n - 1))
  np.testing.assert_array_equal(bon.r_bond(log_p_lt, log_p_le, 4), log_p_le)
  # Rank-only: a monotone transform of the reward leaves r_BOND unchanged.
  lt2, le2 = bon.log_quantiles(log_pi, jnp.asarray(np.exp(3 * reward)))
  np.testing.assert_array_equal(
    bon.r_bond(lt2, le2, 4, True), bon.r_bond(log_p_lt, log_p_le, 4, True)
  )
  with pytest.raises(ValueError):
    bon.beta_bond(1)


def _ref_log_bon_f64(pi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float64 (log p_lt, log p_le, log pi_BoN) for outcomes already sorted worst to best."""
  p_lt = np.concatenate([[0.0], np.cumsum(pi)[:-1]])
  p_gt = np.concatenate([np.cumsum(pi[::-1])[::-1][1:], [0.0]])
  log_le = np.array(
    [
      math.log1p(-g) if g < 0.5 else math.log(lt + p)
      for lt, g, p in zip(p_lt, p_gt, pi, strict=True)
    ]
  )
  log_lt = np.array(
    [
      math.log1p(-(g + p)) if g + p < 0.5 else (math.log(lt) if lt > 0 else -math.inf)
      for lt, g, p in zip(p_lt, p_gt, pi, strict=True)
    ]
  )
  log_bon = []
  for lt, p, le in zip(p_lt, pi, log_le, strict=True):
    log_b = 0.0
    if lt > 0:
      lq = -math.log1p(p / lt)
      log_b = math.log(-math.expm1(n * lq)) - math.log(-math.expm1(lq))
    log_bon.append(math.log(p) + (n - 1) * le + log_b)
  return log_lt, log_le, np.array(log_bon)


def test_stability_n1024_tiny_masses_and_extreme_quantiles():
  n = 1024
  # Sorted worst -> best: a 1e-30 worst outcome, bulk mass, a 1e-30 outcome just
  # below a 1e-4 one, and a 1e-30 best outcome (quantiles within 1e-30 of 0 and 1).
  pi = np.array([1e-30, 0.3, 0.2, 1e-3, 1e-30, 1e-4, 1e-30])
  pi[1] = 1.0 - (pi.sum() - pi[1])
  reward = jnp.arange(7.0)
  log_pi = jnp.asarray(np.log(pi), jnp.float32)
  log_p_lt, log_p_le = bon.log_quantiles(log_pi, reward)
  ref_lt, ref_le, ref_bon = _ref_log_bon_f64(pi, n)
  np.testing.assert_allclose(log_p_le, ref_le, rtol=1e-5)
  np.testing.assert_allclose(log_p_lt[1:], ref_lt[1:], rtol=1e-5)
  assert log_p_lt[0] == -np.inf and log_p_le[-1] == 0.0
  assert float(log_p_lt[-1]) == pytest.approx(-1e-30, rel=1e-5)  # p_lt = 1 - 1e-30
  thm1 = bon.log_pi_bon_theorem1(log_pi, log_p_lt, log_p_le, n)
  assert np.all(np.isfinite(thm1))
  np.testing.assert_allclose(thm1, ref_bon, rtol=1e-5, atol=1e-4)
  # The closed form is exact wherever pi_ref is resolvable next to p_le.
  closed = bon.log_pi_bon(log_p_lt, log_p_le, n)
  ok = np.array([0, 1, 2, 3, 5])
  np.testing.assert_allclose(closed[ok], ref_bon[ok], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.exp(thm1).sum(), 1.0, rtol=1e-5)
  # Callers jit their steps: XLA fusion must not undo the log1p / expm1 care.
  jitted = jax.jit(lambda lp: bon.log_pi_bon_theorem1(lp, *bon.log_quantiles(lp, reward), n))
  np.testing.assert_allclose(jitted(log_pi), ref_bon, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('n_anchor', [2, 3])
@pytest.mark.parametrize('reward', [np.array([0.2, -1.0, 3.0, 0.9, 1.5]), TIED_REWARD])
def test_jbond_expected_reward_brute_force(n_anchor, reward):
  pi = _random_pi(np.random.default_rng(n_anchor), 5)
  tuples = np.array(list(itertools.product(range(5), repeat=n_anchor)))
  weight_T = np.prod(pi[tuples], axis=-1)
  anchors_TxN = jnp.asarray(reward[tuples])
  for y in range(5):
    r_j = bon.jbond_reward(jnp.full(len(tuples), reward[y]), anchors_TxN, n_anchor)
    # Strict "<": ties with an anchor are not penalised, so p_le counts ties as <=.
    p_le = pi[reward <= reward[y]].sum()
    np.testing.assert_allclose(
      np.sum(weight_T * np.asarray(r_j)),
      bon.expected_jbond_reward(p_le, n_anchor),
      rtol=1e-5,
      atol=1e-7,
    )


def test_jbond_alpha_values():
  assert bon.jbond_alpha(2) == pytest.approx(-math.log(16))  # Eq. 17
  assert bon.jbond_alpha(3) == pytest.approx(-16 * math.log(2))  # (n - 1) 2^n log 2
  with pytest.raises(ValueError):
    bon.jbond_reward(jnp.zeros(3), jnp.zeros((3, 2)), 3)


@pytest.mark.parametrize('n_anchor', [2, 3, 4])
def test_jbond_penalty_matches_best_of_n_reward_at_the_median(n_anchor):
  """With n anchors the forward term distils Best-of-n of the anchor, whose backward-KL
  reward is (n - 1) log p_le (Eq. 15, N = n): the expected r_J of a sample at the median
  p_le = 1/2 must be (n - 1) log 1/2 (ALGORITHMS.md section 6, with its erratum)."""
  want = (n_anchor - 1) * math.log(0.5)
  # Closed form.
  assert float(bon.expected_jbond_reward(0.5, n_anchor)) == pytest.approx(want, rel=1e-6)

  # Every anchor draw of a uniform 4-outcome pi_ref, where outcome 1 has p_le = 1/2 exactly.
  reward = np.array([0.0, 1.0, 2.0, 3.0])
  tuples = np.array(list(itertools.product(range(4), repeat=n_anchor)))
  r_j = bon.jbond_reward(jnp.full(len(tuples), reward[1]), jnp.asarray(reward[tuples]), n_anchor)
  assert float(np.mean(np.asarray(r_j))) == pytest.approx(want, rel=1e-6)

  # Every anchor draw on the exact testbed (its decoder's pi_ref over 2^3 sequences): the
  # code's r_J has expectation alpha_n (1 - p_le)^n for every y, which at 1/2 is `want`.
  tb, ref_params = testbed.make(seed=n_anchor, num_prompts=1, vocab=2, length=3)
  pi_ref = np.exp(np.asarray(tb.log_probs(ref_params), np.float64))[0]
  p_le = np.exp(np.asarray(tb.log_quantiles(tb.log_probs(ref_params))[1], np.float64))[0]
  rewards_Y = tb.reward_PxY[0]
  tuples = np.array(list(itertools.product(range(len(pi_ref)), repeat=n_anchor)))
  weight_T = np.prod(pi_ref[tuples], axis=-1)
  anchors_TxN = jnp.asarray(rewards_Y[tuples], jnp.float32)
  for y in range(len(pi_ref)):
    r_j = bon.jbond_reward(jnp.full(len(tuples), rewards_Y[y], jnp.float32), anchors_TxN, n_anchor)
    expected = float(np.sum(weight_T * np.asarray(r_j, np.float64)))
    if p_le[y] < 1.0 - 1e-6:
      alpha_hat = expected / (1.0 - p_le[y]) ** n_anchor  # the penalty applied, in nats
      assert alpha_hat * 0.5**n_anchor == pytest.approx(want, rel=2e-4)
    else:
      assert expected == 0.0  # the best sequence is never penalised


def test_mc_log_quantile_finite_and_exact_expectation():
  k = 4
  out = bon.mc_log_quantile(
    jnp.array([-jnp.inf, 0.0, 5.0, jnp.inf]), jnp.array([[0.0, 1, 2, 3]] * 4)
  )
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(np.exp(out), [1 / 5, 2 / 5, 1.0, 1.0], rtol=1e-6)
  for p in (0.0, 0.13, 0.5, 0.97, 1.0):
    # Exact E over C ~ Binomial(k, p), evaluating the estimator itself for each count.
    expect = 0.0
    for c in range(k + 1):
      anchors = jnp.array([[0.0] * c + [2.0] * (k - c)])
      p_hat = float(np.exp(bon.mc_log_quantile(jnp.array([1.0]), anchors))[0])
      expect += math.comb(k, c) * p**c * (1 - p) ** (k - c) * p_hat
    assert float(bon.mc_quantile_expectation(p, k)) == pytest.approx(expect, rel=1e-6)
    assert expect == pytest.approx(p + (1 - p) / (k + 1), rel=1e-6)


def test_mc_log_quantile_expectation_brute_force():
  # E[log p_hat] over C ~ Binomial(k, p), evaluating the estimator itself for each count.
  for k in (1, 4, 16):
    for p in (0.0, 0.13, 0.5, 0.97, 1.0):
      expect = 0.0
      for c in range(k + 1):
        anchors = jnp.array([[0.0] * c + [2.0] * (k - c)])
        log_p_hat = float(bon.mc_log_quantile(jnp.array([1.0]), anchors)[0])
        expect += math.comb(k, c) * p**c * (1 - p) ** (k - c) * log_p_hat
      got = float(bon.mc_log_quantile_expectation(p, k))
      assert got == pytest.approx(expect, rel=1e-5, abs=1e-6)
  # Jensen: the estimator's log is biased *down* from log E[p_hat] = log(p + (1-p)/(k+1)).
  p = jnp.linspace(0.05, 0.95, 7)
  log_mean = np.log(bon.mc_quantile_expectation(p, 16))
  assert np.all(bon.mc_log_quantile_expectation(p, 16) < log_mean)


def test_mc_log_quantile_simulated_mean():
  rng = np.random.default_rng(0)
  k, rows = 4, 20000
  for p in (0.1, 0.5, 0.9):
    anchors = jnp.asarray(rng.uniform(size=(rows, k)), jnp.float32)
    est = np.exp(bon.mc_log_quantile(jnp.full(rows, p, jnp.float32), anchors))
    # std of the mean <= 0.5 / sqrt(rows) ~ 0.0035; 0.015 is > 4 sigma.
    assert abs(est.mean() - float(bon.mc_quantile_expectation(p, k))) < 0.015


def test_bon_expected_max_brute_force():
  rng = np.random.default_rng(4)
  k = 6
  rewards_BxK = rng.integers(0, 5, size=(3, k)).astype(np.float32)  # includes ties
  for n in range(1, k + 1):
    truth = [np.mean([max(c) for c in itertools.combinations(row, n)]) for row in rewards_BxK]
    np.testing.assert_allclose(bon.bon_expected_max(jnp.asarray(rewards_BxK), n), truth, rtol=1e-5)
  np.testing.assert_allclose(
    bon.bon_expected_max(jnp.asarray(rewards_BxK), 1), rewards_BxK.mean(-1), rtol=1e-6
  )
  np.testing.assert_allclose(
    bon.bon_expected_max(jnp.asarray(rewards_BxK), k), rewards_BxK.max(-1), rtol=1e-6
  )
  big = bon.bon_expected_max(jnp.asarray(rng.normal(size=(2, 1024)), jnp.float32), 16)
  assert np.all(np.isfinite(big))
