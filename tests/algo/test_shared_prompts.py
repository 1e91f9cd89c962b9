"""The update reads a prompt once for all of its rows (`StepConfig.share_prompts`): its loss,
log-likelihoods and gradient equal those of reading every row whole, for J-BOND (a policy
sample and a Best-of-2 row per prompt) and REINFORCE with two policy samples per prompt,
whole and in micro-batches of rows; and the groups map back to the rows' order."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond_jax.algo import rollout as rollout_lib
from bond_jax.algo import step as step_lib
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.state import init_state
from bond_jax.data import tasks as tasks_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import parameter_free

NUM_PROMPTS = 4


def _reward(prompt, valid, response, mask):
  del prompt, valid
  return jnp.sum(jnp.where(mask, response, 0), axis=-1).astype(jnp.float32)


def test_groups_map_back_to_rows():
  tokens = jnp.arange(5 * 2 + 5)[:, None]  # 5 prompts x 2 rows, then one extra row each
  rows = rollout_lib.Rows(
    jnp.repeat(jnp.arange(5)[:, None], 2, axis=0),
    jnp.ones((10, 1), bool),
    tokens[:10],
    jnp.ones((10, 1), bool),
  )
  extra = rollout_lib.Rows(
    jnp.arange(5)[:, None], jnp.ones((5, 1), bool), tokens[10:], jnp.ones((5, 1), bool)
  )
  groups = rollout_lib.group_by_prompt(rows, 2, extra)
  np.testing.assert_array_equal(groups.prompt_BxP[:, 0], np.arange(5))
  np.testing.assert_array_equal(
    groups.tokens_BxRxG[..., 0], [[0, 1, 10], [2, 3, 11], [4, 5, 12], [6, 7, 13], [8, 9, 14]]
  )
  policy, bon = rollout_lib.split_groups(groups.tokens_BxRxG[..., 0], 2)
  np.testing.assert_array_equal(policy, np.arange(10))
  np.testing.assert_array_equal(bon, np.arange(10, 15))
  alone = rollout_lib.group_by_prompt(rows, 2)  # no extra rows: R = 2
  np.testing.assert_array_equal(alone.tokens_BxRxG[..., 0], np.arange(10).reshape(5, 2))
  assert rollout_lib.split_groups(alone.tokens_BxRxG[..., 0], 2)[1] is None


@pytest.mark.parametrize('algorithm', ['jbond', 'reinforce'])
def test_shared_prompts_give_the_same_update(tiny_cfg, copy_task, algorithm):
  extra = {'num_policy_samples': 2} if algorithm == 'reinforce' else {}
  bond = BondConfig(algorithm=algorithm, **extra)
  sp = sampling.SamplingParams(
    max_new_tokens=copy_task.response_len + 1, eos_id=tasks_lib.EOS, pad_id=tasks_lib.PAD
  )
  base = step_lib.StepConfig(
    model=tiny_cfg, sampling=sp, reward_fn=parameter_free(_reward), bond=bond, share_prompts=False
  )
  params = model_lib.init_params(tiny_cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(5)
  noisy = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params)
  state = init_state(bond, params, params, optax.sgd(1e-3), jax.random.PRNGKey(4))
  state = state.replace(params=noisy)  # a policy away from pi_ref and the anchor
  prompt, valid = copy_task.prompts(jax.random.PRNGKey(7), NUM_PROMPTS)

  @functools.partial(jax.jit, static_argnums=0)
  def update(cfg, state, prompt, valid):
    r1, r2 = jax.random.split(state.rng)
    samples = step_lib.rollout(cfg, state, prompt, valid, None, r1, r2)
    samples = step_lib.reference(cfg, state, samples)
    returns = step_lib.targets(cfg, state, samples)
    return step_lib.loss_and_grad(cfg, state.params, samples, returns)

  want = update(base, state, prompt, valid)
  for micro in (0, 4):
    shared = dataclasses.replace(base, share_prompts=True, micro_batch=micro)
    got = update(shared, state, prompt, valid)
    (loss, _, logp_B), grads = got
    (want_loss, _, want_logp_B), want_grads = want
    np.testing.assert_allclose(logp_B, want_logp_B, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
      scale = float(np.abs(np.asarray(h)).max())
      assert scale > 0
      np.testing.assert_allclose(g, h, rtol=0, atol=1e-5 * scale)
