"""The evaluation's estimators against independent truths on the exact testbed: per-sample
log-likelihoods from the testbed's exact table, Best-of-N rewards by enumerating every
N-subset, win rates and quantiles by counting, and the KLs to pi_BoN against their exact
values by summation."""

import itertools

import jax
import numpy as np
import pytest

from bond_jax.algo import bon
from bond_jax.eval import estimates, testbed
from bond_jax.types import parameter_free

TB, REF = testbed.make(seed=3)
POLICY = jax.tree.map(
  lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), REF
)
ROWS, K, M, N = 256, 64, 8, 4  # rows alternate between the testbed's 2 prompts


@pytest.fixture(scope='module')
def scores():
  prompt, valid = TB.prompts(ROWS)
  reward_fn = parameter_free(TB.reward_fn)
  score = jax.jit(
    lambda sample_params, rng, per_prompt, sampled_by: estimates.score_samples(
      TB.cfg, sample_params, POLICY, REF, prompt, valid, rng, TB.sampling_params(), per_prompt,
      reward_fn, None, sampled_by,
    ),
    static_argnums=(2, 3),
  )  # fmt: skip
  # As the evaluation scores them: each model's own samples read by the other model only.
  ref = score(REF, jax.random.PRNGKey(2), K, 'ref')
  policy = score(POLICY, jax.random.PRNGKey(3), M, 'policy')
  reread = score(REF, jax.random.PRNGKey(2), K, None)  # both models read the samples
  return np.asarray(prompt[:, 0]), jax.device_get(policy), jax.device_get(ref), reread


def test_sampler_log_likelihoods_equal_a_second_read(scores):
  """The sampler's log-likelihood of its own sample is the model's: reading the samples
  again (teacher forcing) gives the same values; the samples are the same."""
  _, _, ref, reread = scores
  np.testing.assert_array_equal(ref.tokens_BxSxG, reread.tokens_BxSxG)
  np.testing.assert_array_equal(ref.logp_policy_BxS, reread.logp_policy_BxS)
  np.testing.assert_allclose(ref.logp_ref_BxS, reread.logp_ref_BxS, atol=1e-5)
  assert np.ptp(ref.logp_ref_BxS) > 1.0  # not all equal: the check can fail


def test_nll_per_token_under_pi_ref(scores):
  _, policy, ref, _ = scores
  for s in (policy, ref):
    want = -np.sum(s.logp_ref_BxS) / np.sum(s.mask_BxSxG)
    assert float(estimates.nll_per_token(s)) == pytest.approx(want, rel=1e-5)


def test_log_likelihoods_and_kl_ref_are_exact_per_sample(scores):
  """Each sample's log pi and log pi_ref equal the testbed's exact table at its sequence;
  the KL estimate is their mean, and it is close to the exact KL."""
  prompt_B, policy, ref, _ = scores
  exact_pi, exact_ref = np.asarray(TB.log_probs(POLICY)), np.asarray(TB.log_probs(REF))
  # Recover each sample's sequence from its reward (the default table has distinct values).
  code_of = lambda p, r: np.flatnonzero(TB.reward_PxY[p] == r)[0]
  for s in (policy, ref):
    pairs = zip(prompt_B, s.reward_BxS, strict=True)
    code_BxS = np.array([[code_of(p, r) for r in row] for p, row in pairs])
    np.testing.assert_allclose(s.logp_policy_BxS, exact_pi[prompt_B[:, None], code_BxS], atol=2e-4)
    np.testing.assert_allclose(s.logp_ref_BxS, exact_ref[prompt_B[:, None], code_BxS], atol=2e-4)
  metrics = jax.device_get(estimates.policy_metrics(policy, ref))
  mc_kl = float(np.mean(policy.logp_policy_BxS - policy.logp_ref_BxS))
  assert float(metrics['kl_ref']) == pytest.approx(mc_kl, rel=1e-5)
  exact_kl = float(np.mean(testbed.kl(exact_pi, exact_ref)))
  assert float(metrics['kl_ref']) == pytest.approx(exact_kl, abs=0.1)  # 2048 samples


def test_rewards_win_rate_and_quantile_by_counting(scores):
  _, policy, ref, _ = scores
  metrics = jax.device_get(estimates.policy_metrics(policy, ref))
  table = jax.device_get(estimates.reference_metrics(ref, (1, 2, 4)))
  assert float(metrics['reward']) == pytest.approx(float(np.mean(policy.reward_BxS)), rel=1e-5)
  per_prompt = policy.reward_BxS.mean(axis=1)
  assert float(metrics['reward_stderr']) == pytest.approx(
    per_prompt.std() / np.sqrt(len(per_prompt)), rel=1e-5
  )
  assert float(table['reward_bon_1']) == pytest.approx(float(np.mean(ref.reward_BxS)), rel=1e-5)
  for n in (2, 4):  # the mean of the max over every n-subset of a prompt's K samples
    rows = ref.reward_BxS[:8, :12]
    want = np.mean([np.mean([max(c) for c in itertools.combinations(r, n)]) for r in rows])
    got = float(np.mean(bon.bon_expected_max(rows, n)))
    assert got == pytest.approx(want, rel=1e-5)
  wins = [
    (y > r) + 0.5 * (y == r)
    for row_p, row_r in zip(policy.reward_BxS, ref.reward_BxS, strict=True)
    for y in row_p
    for r in row_r
  ]
  assert float(metrics['win_rate']) == pytest.approx(float(np.mean(wins)), rel=1e-5)
  below_or_tied = (ref.reward_BxS[:, None, :] <= policy.reward_BxS[..., None]).sum(-1)
  want_quantile = np.mean(np.log((1 + below_or_tied) / (K + 1)))
  assert float(metrics['log_quantile']) == pytest.approx(want_quantile, rel=1e-5)


def test_kl_to_best_of_n_against_exact_values(scores):
  """The Monte-Carlo KLs to Best-of-4 of pi_ref land near the testbed's exact sums (3.0 and
  10.4 nats). Over 12 seeds (this test's shapes) their errors had means 0.014 and -0.014 and
  standard deviations 0.023 and 0.066, so the bounds are about 4 standard deviations."""
  _, policy, ref, _ = scores
  metrics = jax.device_get(estimates.policy_metrics(policy, ref, kl_n=N))
  exact = jax.device_get(TB.evaluate(POLICY, REF, N))
  assert float(metrics['kl_bwd']) == pytest.approx(float(exact['kl_bwd']), abs=0.1)
  assert float(metrics['kl_fwd']) == pytest.approx(float(exact['kl_fwd']), abs=0.25)
  with pytest.raises(ValueError, match='at least 65'):
    estimates.kl_to_bon(policy, ref, K + 1)
