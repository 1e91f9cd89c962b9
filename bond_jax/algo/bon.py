"""Best-of-N math for BOND / J-BOND (Sessa et al., 2024), in log space.

Everything here is a pure ``jax.numpy`` function, written to stay finite and
accurate in float32 for N up to ~1024 and for quantiles close to 0 or 1. Array
names carry shape suffixes: ``_Y`` is the last axis of outcomes (leading batch
axes allowed), ``_B`` a batch of samples, ``_BxK`` K reference/anchor samples per row.

Tie rule. Theorem 1 needs a strict order on outcomes. For exact quantiles over a
discrete outcome set we order by ``(reward, index)``: among equal rewards the
outcome with the LOWER index counts as worse. Sample-based estimators
(``mc_log_quantile``, ``jbond_reward``) only see rewards, and say how they treat
ties in their own docstrings.
"""

import math

import jax
import jax.numpy as jnp

Array = jax.Array
_LOG_HALF = -math.log(2.0)


def _log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's two-branch rule)."""
  # Double `where` keeps gradients finite in the branch that is not selected.
  small = x < _LOG_HALF
  x_small = jnp.where(small, x, _LOG_HALF)
  x_big = jnp.where(small, _LOG_HALF, x)
  return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_big)))


def _log_ratio(log_p_lt: Array, log_p_le: Array) -> Array:
  """log(p_lt / p_le) <= 0, with -inf when p_lt = 0 (also when p_le = 0)."""
  is_worst = log_p_lt == -jnp.inf
  log_q = jnp.minimum(log_p_lt - jnp.where(is_worst, 0.0, log_p_le), 0.0)
  return jnp.where(is_worst, -jnp.inf, log_q)


def _log_geometric_sum(log_q: Array, n: int) -> Array:
  """log sum_{i=1..n} q^(i-1) = log((1 - q^n) / (1 - q)), equal to log n at q = 1."""
  near_one = n * log_q > -1e-3
  lq = jnp.where(near_one, -1.0, log_q)
  exact = _log1mexp(n * lq) - _log1mexp(lq)
  # Series in x = -log q: log n - (n - 1) x / 2 + (n^2 - 1) x^2 / 24 + O((n x)^3).
  lq_small = jnp.where(near_one, log_q, 0.0)
  series = math.log(n) + (n - 1) * lq_small / 2 + (n * n - 1) * lq_small**2 / 24
  return jnp.where(near_one, series, exact)


def _sort_by_reward(reward_Y: Array) -> tuple[Array, Array]:
  """Permutation sorting by (reward, index) ascending, and its inverse."""
  order_Y = jnp.argsort(reward_Y, axis=-1, stable=True)  # stable: lower index first on ties
  return order_Y, jnp.argsort(order_Y, axis=-1)


def quantiles(pi_ref_Y: Array, reward_Y: Array) -> tuple[Array, Array]:
  """Exact p_lt(y) = P[y' < y] and p_le(y) = P[y' <= y] under pi_ref (Theorem 1, Eq. 2-5).

  ``<`` is the strict order by (reward, index) of the module docstring, so
  ``p_le - p_lt == pi_ref`` holds for every outcome, tied rewards included.
  """
  order_Y, inverse_Y = _sort_by_reward(reward_Y)
  pi_sorted_Y = jnp.take_along_axis(pi_ref_Y, order_Y, axis=-1)
  p_le_sorted_Y = jnp.cumsum(pi_sorted_Y, axis=-1)
  p_le_Y = jnp.take_along_axis(p_le_sorted_Y, inverse_Y, axis=-1)
  return p_le_Y - pi_ref_Y, p_le_Y


def log_quantiles(log_pi_ref_Y: Array, reward_Y: Array) -> tuple[Array, Array]:
  """log p_lt and log p_le (Theorem 1, Eq. 2-5), tie rule as in ``quantiles``.

  ``log_pi_ref_Y`` is renormalised over the last axis. Quantiles below 1/2 come
  from a cumulative logsumexp of the outcomes ranked below; those above 1/2
  from log1p(-mass ranked above), so that p close to 1 keeps its precision.
  The worst outcome gets log p_lt = -inf and the best log p_le = 0 exactly.
  """
  log_pi_Y = log_pi_ref_Y - jax.nn.logsumexp(log_pi_ref_Y, axis=-1, keepdims=True)
  order_Y, inverse_Y = _sort_by_reward(reward_Y)
  log_pi_sorted_Y = jnp.take_along_axis(log_pi_Y, order_Y, axis=-1)
  log_le_Y = jax.lax.cumlogsumexp(log_pi_sorted_Y, axis=log_pi_Y.ndim - 1)
  log_ge_Y = jax.lax.cumlogsumexp(log_pi_sorted_Y, axis=log_pi_Y.ndim - 1, reverse=True)
  pad = jnp.full(log_le_Y.shape[:-1] + (1,), -jnp.inf, log_le_Y.dtype)
  log_lt_Y = jnp.concatenate([pad, log_le_Y[..., :-1]], axis=-1)
  log_gt_Y = jnp.concatenate([log_ge_Y[..., 1:], pad], axis=-1)
  log_le_Y = jnp.where(log_le_Y < _LOG_HALF, log_le_Y, _log1mexp(jnp.minimum(log_gt_Y, 0.0)))
  log_lt_Y = jnp.where(log_lt_Y < _LOG_HALF, log_lt_Y, _log1mexp(jnp.minimum(log_ge_Y, 0.0)))
  unsort = lambda a: jnp.take_along_axis(a, inverse_Y, axis=-1)
  return unsort(log_lt_Y), unsort(log_le_Y)


def log_pi_bon(log_p_lt: Array, log_p_le: Array, n: int) -> Array:
  """Closed form of Theorem 1 (Eq. 5): log(p_le^N - p_lt^N).

  Computed as ``N log p_le + log(1 - (p_lt/p_le)^N)`` with log1p / expm1, exact
  for the worst outcome (p_lt = 0 gives N log pi_ref). Precision is that of
  ``log_p_lt - log_p_le``: when pi_ref(y) is far below the float32 spacing of
  p_le (e.g. 1e-30 next to p_le ~ 1) prefer ``log_pi_bon_theorem1``.
  """
  log_q = _log_ratio(log_p_lt, log_p_le)
  out = n * log_p_le + _log1mexp(n * log_q)
  return jnp.where(log_p_le == -jnp.inf, -jnp.inf, out)


def log_correction_b(log_p_lt: Array, log_p_le: Array, n: int) -> Array:
  """log of the correction factor (B) = sum_{i=1..N} (p_lt/p_le)^(i-1) (Theorem 1, Eq. 4).

  (B) lies in [1, N]: 1 for the worst outcome, N when pi_ref(y) -> 0.
  """
  return _log_geometric_sum(_log_ratio(log_p_lt, log_p_le), n)


def log_pi_bon_theorem1(log_pi_ref: Array, log_p_lt: Array, log_p_le: Array, n: int) -> Array:
  """Theorem 1's product form (Eq. 3-4): log pi_ref + (N-1) log p_le + log (B).

  The ratio p_lt/p_le is taken as 1 / (1 + pi_ref/p_lt) from ``log_pi_ref``, so
  it stays accurate when pi_ref(y) is tiny next to p_le(y), where the closed
  form loses it.
  """
  is_worst = log_p_lt == -jnp.inf
  # log(p_lt / (p_lt + pi_ref)); -inf for the worst outcome.
  log_q = jnp.where(
    is_worst, -jnp.inf, -jax.nn.softplus(log_pi_ref - jnp.where(is_worst, 0.0, log_p_lt))
  )
  return log_pi_ref + (n - 1) * log_p_le + _log_geometric_sum(log_q, n)


def beta_bond(n: int) -> float:
  """KL coefficient beta_BOND = 1/(N-1) of the BOND-as-RLHF view (Eq. 7-8)."""
  if n < 2:
    raise ValueError(f'beta_BOND needs N >= 2, got {n}')
  return 1.0 / (n - 1)


def r_bond(log_p_lt: Array, log_p_le: Array, n: int, with_correction: bool = False) -> Array:
  """BOND reward r_BOND = log p_le + 1/(N-1) log (B) (Eq. 7-8).

  With it, pi_BoN is proportional to pi_ref * exp(r_BOND / beta_BOND). The paper
  drops the correction in practice (default), leaving r_BOND ~ log p_le, which
  depends on rewards only through their ranks.
  """
  if not with_correction:
    return log_p_le
  return log_p_le + beta_bond(n) * log_correction_b(log_p_lt, log_p_le, n)


def mc_counts(reward_B: Array, samples_BxK: Array) -> tuple[Array, Array]:
  """#{j : r(y_j) < r(y)} and #{j : r(y_j) <= r(y)} over K samples per row (Eq. 10), float32.

  The one place sample-based quantiles count: every estimator below (and the
  evaluation's) is built on these counts. Rewards only, no index rule.
  """
  below_BxK = samples_BxK < reward_B[..., None]
  at_or_below_BxK = samples_BxK <= reward_B[..., None]
  return (
    jnp.sum(below_BxK, axis=-1).astype(jnp.float32),
    jnp.sum(at_or_below_BxK, axis=-1).astype(jnp.float32),
  )


def mc_log_quantiles(reward_B: Array, samples_BxK: Array) -> tuple[Array, Array]:
  """Finite Monte-Carlo (log p_lt, log p_le) from k samples per row (Eq. 10).

  Our estimator counts y itself among the samples:
  ``p_hat = (1 + #{j : r(y_j) <= r(y)}) / (k + 1)`` (and likewise with ``<`` for
  p_lt), so it lies in [1/(k+1), 1] and its log is never -inf. Ties with a
  sample count as "<=". Bias: for a continuous reward law C ~ Binomial(k, p_le),
  so E[p_hat] = (1 + k p_le)/(k + 1) = p_le + (1 - p_le)/(k + 1) >= p_le; see
  ``mc_quantile_expectation``.

  Because y itself is counted in both, the two estimates are equal unless a
  sample ties r(y): the (B) correction built from them (``log_correction_b``) is
  then the constant N, and r_BOND with (B) differs from r_BOND without it by the
  constant log(N)/(N-1), which the leave-one-out baseline removes.
  """
  k = samples_BxK.shape[-1]
  lt_B, le_B = mc_counts(reward_B, samples_BxK)
  return jnp.log1p(lt_B) - math.log(k + 1), jnp.log1p(le_B) - math.log(k + 1)


def mc_log_quantile(reward_B: Array, samples_BxK: Array) -> Array:
  """The log p_le half of ``mc_log_quantiles``: the r_BOND of Eq. 10 without (B)."""
  return mc_log_quantiles(reward_B, samples_BxK)[1]


def mc_quantile_expectation(p_le: Array, k: int) -> Array:
  """E[exp(mc_log_quantile)] for a continuous reward law: (1 + k p_le) / (k + 1)."""
  return (1.0 + k * jnp.asarray(p_le)) / (k + 1)


def mc_log_quantile_expectation(p_le: Array, k: int) -> Array:
  """E[mc_log_quantile] when the count C ~ Binomial(k, p_le) (no ties with other outcomes).

  ``sum_c C(k, c) p^c (1-p)^(k-c) log((1 + c) / (k + 1))``. This, not log p_le, is
  the r_BOND that BOND with MC quantiles follows in expectation (Eq. 10 inside
  Eq. 15): its policy gradient is exactly that of KL(pi || pi_ref exp((N-1) E[log p_hat]) / Z).
  It is finite at p_le = 0 (log 1/(k+1)) and 0 at p_le = 1.
  """
  p = jnp.asarray(p_le, jnp.float32)[..., None]
  c = jnp.arange(k + 1, dtype=jnp.float32)
  log_comb = jnp.asarray(
    [math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1) for j in range(k + 1)],
    jnp.float32,
  )
  # xlogy keeps 0 * log 0 = 0 at p in {0, 1}.
  log_pmf = log_comb + jax.scipy.special.xlogy(c, p) + jax.scipy.special.xlog1py(k - c, -p)
  return jnp.sum(jnp.exp(log_pmf) * (jnp.log1p(c) - math.log(k + 1)), axis=-1)


def jbond_alpha(n_anchor: int) -> float:
  """Penalty alpha_n = -(n - 1) 2^n log 2 in nats (alpha_2 = -log 16, Eq. 17).

  With n anchor samples the forward term distils Best-of-n of the anchor, whose
  backward-KL reward is (n - 1) log p_le (Eq. 15 with N = n). alpha_n makes
  E[r_J] = alpha_n (1 - p_le)^n equal that at the median p_le = 1/2, so both
  halves of the Jeffreys mix aim at the same Best-of-n. The n > 2 generalisation
  is ours (ALGORITHMS.md section 6, with its erratum).
  """
  if n_anchor < 1:
    raise ValueError(f'n_anchor must be >= 1, got {n_anchor}')
  return -(n_anchor - 1) * (2.0**n_anchor) * math.log(2.0)


def jbond_reward(reward_B: Array, anchor_rewards_BxN: Array, n_anchor: int) -> Array:
  """J-BOND reward (Eq. 17): alpha_n if r(y) < min_j r(y_j), else 0.

  The comparison is strict: a sample tied with its worst anchor is not
  penalised, so with p_le counting ties as "<=", E[r_J] = alpha_n (1 - p_le)^n.
  """
  if anchor_rewards_BxN.shape[-1] != n_anchor:
    raise ValueError(f'expected {n_anchor} anchors, got shape {anchor_rewards_BxN.shape}')
  worse_than_all_B = reward_B < jnp.min(anchor_rewards_BxN, axis=-1)
  return jnp.where(worse_than_all_B, jbond_alpha(n_anchor), 0.0).astype(jnp.float32)


def expected_jbond_reward(p_le: Array, n_anchor: int) -> Array:
  """E over n anchors of r_J(y): alpha_n (1 - p_le)^n (Eq. 23-24, generalised to n)."""
  return jbond_alpha(n_anchor) * (1.0 - jnp.asarray(p_le)) ** n_anchor


def best_of_n_rank_weights(k: int, n: int) -> list[float]:
  """P[the best of n draws without replacement from K samples is the one of rank j],
  j = 1..K ascending (1 = worst): C(j-1, n-1) / C(K, n), in float64 from log-gamma."""
  if not 1 <= n <= k:
    raise ValueError(f'need 1 <= n <= K, got n={n}, K={k}')
  log_c_kn = math.lgamma(k + 1) - math.lgamma(n + 1) - math.lgamma(k - n + 1)
  return [
    math.exp(math.lgamma(j) - math.lgamma(n) - math.lgamma(j - n + 1) - log_c_kn) if j >= n else 0.0
    for j in range(1, k + 1)
  ]


def bon_expected_max(rewards_BxK: Array, n: int) -> Array:
  """Unbiased estimate of E[max of n i.i.d. rewards] from K >= n samples per row.

  Averages the max over all n-subsets (without replacement): with ascending
  order statistics r_(1..K), E = sum_j r_(j) C(j-1, n-1) / C(K, n)
  (`best_of_n_rank_weights`).
  """
  weights_K = best_of_n_rank_weights(rewards_BxK.shape[-1], n)
  sorted_BxK = jnp.sort(rewards_BxK, axis=-1)
  return sorted_BxK @ jnp.asarray(weights_K, dtype=sorted_BxK.dtype)
