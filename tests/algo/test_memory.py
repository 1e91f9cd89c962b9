"""The memory knobs change what is held at once, never the result: a step with
rematerialised blocks, sampling in micro-batches of prompts, gradients accumulated over
micro-batches of rows and log-probs projected a chunk of positions at a time equals the
plain step; and it needs measurably less memory (XLA's own figures, compiled ahead of time).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond_jax.algo import rollout as rollout_lib
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.state import init_state
from bond_jax.algo.step import StepConfig, train_step
from bond_jax.data import tasks as tasks_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import parameter_free

NUM_PROMPTS = 8
# Each memory knob on, at a size that splits the batch into several pieces.
LEAN = dict(sample_micro_batch=2, micro_batch=4, logprob_chunk=2)


def _reward(prompt, valid, response, mask):
  """Many distinct values even for a random policy, so every J-BOND case occurs."""
  del prompt, valid
  return jnp.sum(jnp.where(mask, response, 0), axis=-1).astype(jnp.float32)


# The vocabulary is large enough that logits dominate the plain step's temporaries, so the
# lean step's saving shows in XLA's figures (test_lean_step_needs_less_memory); the
# response is the copy task's (its length is a multiple of LEAN['logprob_chunk']).
VOCAB = 2048


def _plain_and_lean(tiny_cfg, copy_task):
  # J-BOND with every term on: 1 policy and 2 anchor samples per prompt, Best-of-2 rows in
  # the loss, an EMA anchor.
  cfg = dataclasses.replace(tiny_cfg, vocab_size=VOCAB)
  bond = BondConfig(algorithm='jbond', beta=0.5, gamma=0.25, eta=0.2)
  sp = sampling.SamplingParams(
    max_new_tokens=copy_task.response_len + 1, eos_id=tasks_lib.EOS, pad_id=tasks_lib.PAD
  )
  plain = StepConfig(model=cfg, sampling=sp, reward_fn=parameter_free(_reward), bond=bond)
  lean = dataclasses.replace(plain, model=dataclasses.replace(cfg, remat='block'), **LEAN)
  assert sp.max_new_tokens % LEAN['logprob_chunk'] == 0
  return plain, lean


@pytest.fixture(scope='module')
def steps(tiny_cfg, copy_task):
  """{'plain', 'lean'}: (the step compiled ahead of time, its start state); the same
  programs serve the equality test (run) and the memory test (XLA's figures), so each is
  compiled once. `prompt` and `valid` are the batch both were compiled for."""
  plain, lean = _plain_and_lean(tiny_cfg, copy_task)
  params = model_lib.init_params(plain.model, jax.random.PRNGKey(0))
  prompt, valid = copy_task.prompts(jax.random.PRNGKey(7), NUM_PROMPTS)
  # Plain SGD: Adam divides by sqrt(v), which turns float32 rounding in a near-zero gradient
  # into a parameter difference of up to the learning rate; SGD keeps the comparison linear.
  schedule = optax.constant_schedule(1e-3)
  tx = optax.sgd(schedule)
  out = {'prompt': prompt, 'valid': valid}
  for name, step_cfg in (('plain', plain), ('lean', lean)):
    state = init_state(step_cfg.bond, params, params, tx, jax.random.PRNGKey(4))
    # A policy away from pi_ref and the anchor, so every loss term is non-trivial.
    rng = np.random.default_rng(5)
    noisy = lambda x, rng=rng: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    state = state.replace(params=jax.tree.map(noisy, state.params))
    step = jax.jit(functools.partial(train_step, cfg=step_cfg, tx=tx, schedule=schedule))
    out[name] = (step.lower(state, prompt, valid, None).compile(), state)
  return out


def _two_steps(compiled, state, prompt, valid):
  history = []
  for _ in range(2):
    state, metrics = compiled(state, prompt, valid, None)
    history.append(metrics)
  return state, history


def test_lean_step_equals_the_plain_step(steps):
  prompt, valid = steps['prompt'], steps['valid']
  start = steps['plain'][1]
  state_p, metrics_p = _two_steps(*steps['plain'], prompt, valid)
  state_l, metrics_l = _two_steps(*steps['lean'], prompt, valid)
  # Same samples (each row keyed by its index, whichever micro-batch draws it) ...
  for m_p, m_l in zip(metrics_p, metrics_l, strict=True):
    assert float(m_p['generated_tokens']) == float(m_l['generated_tokens'])
    np.testing.assert_allclose(m_l['reward_policy'], m_p['reward_policy'], rtol=0, atol=0)
    # The loss is a difference of terms ~40x its size: float32 rounding of the terms.
    scale = sum(abs(float(m_p[k])) for k in ('loss_fwd', 'loss_bwd', 'loss_reg'))
    for k in ('loss', 'loss_fwd', 'loss_bwd', 'loss_reg'):
      np.testing.assert_allclose(m_l[k], m_p[k], rtol=0, atol=1e-5 * scale)
  # ... and the same update, to float32 rounding, after two steps: in every tensor the
  # two runs' parameters differ by at most 1e-4 of the largest change the plain run made
  # (plus two units in the last place of the value itself). One step's gradients differ by
  # ~2e-6 of their largest entry (summation order); a wrong micro-batch weighting or a
  # missing row would differ by the order of the change itself.
  for name in ('params', 'anchor_params'):
    # Both runs start from the same state (same seeds), so the comparison starts equal.
    jax.tree.map(
      np.testing.assert_array_equal, getattr(steps['lean'][1], name), getattr(start, name)
    )
    for lean_x, plain_x, start_x in zip(
      *(jax.tree.leaves(getattr(s, name)) for s in (state_l, state_p)),
      jax.tree.leaves(getattr(start, name)),
      strict=True,
    ):
      start_x = np.asarray(start_x)
      change = float(np.abs(np.asarray(plain_x) - start_x).max())
      assert change > 0, name  # every tensor moved: the comparison is not vacuous
      plain_x, lean_x = np.asarray(plain_x), np.asarray(lean_x)
      bound = 1e-4 * change + 2 * np.spacing(np.abs(plain_x))
      assert np.all(np.abs(lean_x - plain_x) <= bound), name


def test_micro_batches_are_strided_and_join_back_in_order():
  x = jnp.arange(12).reshape(12, 1)
  parts = rollout_lib.split_micro_batches(x, 3)
  np.testing.assert_array_equal(parts[1, :, 0], [1, 4, 7, 10])
  np.testing.assert_array_equal(rollout_lib.join_micro_batches(parts), x)
  with pytest.raises(ValueError, match=r'config\.train\.micro_batch_size=5 must divide the 12'):
    rollout_lib.num_micro_batches(12, 5, 'train.micro_batch_size')


def test_a_prompt_draws_the_same_samples_alone_or_in_a_batch(tiny_cfg, tiny_params, copy_task):
  # The batch is the shape tests/algo/test_jbond.py's recompute draws its anchor samples at
  # (16 prompts, 2 samples each, the copy task's sampler): the same compiled sampler.
  sp = sampling.SamplingParams(
    max_new_tokens=copy_task.response_len + 1, eos_id=tasks_lib.EOS, pad_id=tasks_lib.PAD
  )
  prompt, valid = copy_task.prompts(jax.random.PRNGKey(3), 16)
  rng = jax.random.PRNGKey(11)
  whole = sampling.sample_jit(tiny_cfg, tiny_params, prompt, valid, rng, sp, num_samples=2)
  third = sampling.sample_jit(
    tiny_cfg, tiny_params, prompt[2:3], valid[2:3], rng, sp, 2, jnp.array([2])
  )
  np.testing.assert_array_equal(third.tokens_BxG, whole.tokens_BxG[4:6])
  # Different rows of one prompt draw different samples (their keys differ): more distinct
  # rows than prompts.
  assert len({tuple(r) for r in np.asarray(whole.tokens_BxG)}) > len(prompt)


def test_lean_step_needs_less_memory(steps):
  """XLA's temporary bytes of the two compiled steps (the equality test's programs)."""
  plain_bytes, lean_bytes = (
    steps[name][0].memory_analysis().temp_size_in_bytes for name in ('plain', 'lean')
  )
  print(f'temporaries: plain {plain_bytes / 2**20:.2f} MiB, lean {lean_bytes / 2**20:.2f} MiB')
  assert lean_bytes < 0.5 * plain_bytes
