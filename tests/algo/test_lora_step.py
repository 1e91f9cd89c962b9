"""The J-BOND step with LoRA: the gradient reaches the adapters only and equals its closed
form in the full fine-tune's gradient; with a rank above every width, one step moves the
folded weights along the full fine-tune's descent direction; the frozen base never changes;
the anchor's adapters are the EMA of the policy's (Eq. 18 on the adapter tree)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond_jax.algo import step as step_lib
from bond_jax.algo.algorithms import BondConfig
from bond_jax.algo.state import init_state, make_optimizer
from bond_jax.data import tasks as tasks_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import lora, sampling
from bond_jax.types import parameter_free

ALL = tuple(lora.TARGETS)
ETA = 0.2


def _token_sum_reward(prompt, valid, response, mask):
  del prompt, valid
  return jnp.sum(jnp.where(mask, response, 0), axis=-1).astype(jnp.float32)


def _step_cfg(cfg, copy_task):
  sp = sampling.SamplingParams(
    max_new_tokens=copy_task.response_len + 1, eos_id=tasks_lib.EOS, pad_id=tasks_lib.PAD
  )
  return step_lib.StepConfig(
    model=cfg,
    sampling=sp,
    reward_fn=parameter_free(_token_sum_reward),
    bond=BondConfig(beta=0.5, gamma=0.25, eta=ETA),
  )


def _phases(step_cfg, state, prompt, valid):
  """Rollout, reference and targets of one step (what the update reads)."""
  _, k_pol, k_anc = jax.random.split(state.rng, 3)
  samples = step_lib.rollout(step_cfg, state, prompt, valid, None, k_pol, k_anc)
  samples = step_lib.reference(step_cfg, state, samples)
  return samples, step_lib.targets(step_cfg, state, samples)


def _flat(x, k):  # [*in, *out] -> [K, F] with K = prod(in)
  return x.reshape(k, -1)


@pytest.fixture(scope='module')
def grads(tiny_cfg, tiny_params, copy_task):
  """Full fine-tune and LoRA (rank 128, above every width of the tiny model) gradients of the
  same J-BOND loss on the same samples, from the same pi_ref (b = 0: the same policy)."""
  cfg = dataclasses.replace(tiny_cfg, lora=lora.LoraConfig(128, 128.0, ALL))
  full_cfg, lora_cfg = _step_cfg(tiny_cfg, copy_task), _step_cfg(cfg, copy_task)
  tx = optax.sgd(1.0)
  adapters = model_lib.init_adapters(cfg, jax.random.key(3))
  full = init_state(full_cfg.bond, tiny_params, tiny_params, tx, jax.random.key(4))
  low = init_state(lora_cfg.bond, adapters, tiny_params, tx, jax.random.key(4))
  prompt, valid = copy_task.prompts(jax.random.key(7), 16)
  samples, targets = _phases(full_cfg, full, prompt, valid)
  lora_samples, _ = _phases(lora_cfg, low, prompt, valid)
  # Fresh adapters are pi_ref exactly, so the LoRA policy draws the same samples.
  np.testing.assert_array_equal(lora_samples.policy.tokens_BxG, samples.policy.tokens_BxG)
  (loss_full, _, _), g_full = jax.jit(step_lib.loss_and_grad, static_argnums=0)(
    full_cfg, tiny_params, samples, targets
  )
  (loss_lora, _, _), g_lora = jax.jit(step_lib.loss_and_grad, static_argnums=0)(
    lora_cfg, adapters, samples, targets, tiny_params
  )
  np.testing.assert_allclose(loss_lora, loss_full, rtol=1e-6)
  return cfg, adapters, g_full, g_lora, (lora_cfg, samples, targets)


def test_adapter_gradient_is_its_closed_form(grads, tiny_params):
  """y = x W + s (x a) b: at b = 0, dL/db = s a^T dL/dW and dL/da = 0 (a, b, W flattened to
  [K, r], [r, F], [K, F]); and no gradient exists for anything but the adapters."""
  cfg, adapters, g_full, g_lora, _ = grads
  assert jax.tree.structure(g_lora) == jax.tree.structure(adapters)
  s = cfg.lora.scale
  for block in ('attn', 'mlp'):
    for name, ad in adapters['layer_1'][block].items():
      kernel = name.removesuffix(lora.SUFFIX)
      g_w = g_full['layer_1'][block][kernel]['kernel']
      k = ad['a'].size // cfg.lora.rank
      want_b = s * _flat(ad['a'], k).T @ _flat(g_w, k)
      got = g_lora['layer_1'][block][name]
      np.testing.assert_allclose(_flat(got['b'], cfg.lora.rank), want_b, rtol=2e-3, atol=1e-6)
      np.testing.assert_array_equal(got['a'], 0.0)
      assert float(jnp.abs(want_b).max()) > 0  # the check can fail


def test_one_lora_step_follows_the_full_fine_tune_direction(grads, tiny_params):
  """With SGD from b = 0 the folded weights move by -lr s^2 a a^T dL/dW: the full gradient
  through a positive semi-definite matrix, full rank when the rank exceeds the widths. So
  the LoRA step is a descent direction of the full fine-tune: its cosine with -dL/dW over
  every targeted kernel must exceed 0.8 (with a aligned to nothing, a a^T is near a multiple
  of the identity at this rank), and the loss must drop as the full step's does."""
  cfg, adapters, g_full, g_lora, (lora_cfg, samples, targets) = grads
  lr = 1e-3
  moved = jax.tree.map(lambda a, g: a - lr * g, adapters, g_lora)
  folded = lora.fold(cfg.lora, lora.attach(tiny_params, moved))
  lora_dirs, full_dirs = [], []
  for block in ('attn', 'mlp'):
    for layer in ('layer_0', 'layer_1'):
      for name in adapters[layer][block]:
        kernel = name.removesuffix(lora.SUFFIX)
        delta = folded[layer][block][kernel]['kernel'] - tiny_params[layer][block][kernel]['kernel']
        lora_dirs.append(delta.ravel())
        full_dirs.append(-g_full[layer][block][kernel]['kernel'].ravel())
  u, v = jnp.concatenate(lora_dirs), jnp.concatenate(full_dirs)
  cosine = float(u @ v / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))
  assert cosine > 0.8, cosine
  loss = lambda params: step_lib.loss_and_grad(lora_cfg, params, samples, targets, tiny_params)
  before, after = float(loss(adapters)[0][0]), float(loss(moved)[0][0])
  assert after < before


def test_steps_train_adapters_only_and_move_the_anchor_by_ema(tiny_cfg, tiny_params, copy_task):
  cfg = dataclasses.replace(tiny_cfg, lora=lora.LoraConfig(4, 8.0, ALL))
  step_cfg = _step_cfg(cfg, copy_task)
  tx, schedule = make_optimizer(1e-2, warmup_steps=0)
  adapters = model_lib.init_adapters(cfg, jax.random.key(3))
  state = init_state(step_cfg.bond, adapters, tiny_params, tx, jax.random.key(4))
  # Adam's moments cover the adapters only.
  assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim} <= {
    x.shape for x in jax.tree.leaves(adapters)
  }
  step = jax.jit(functools.partial(step_lib.train_step, cfg=step_cfg, tx=tx, schedule=schedule))
  prompt, valid = copy_task.prompts(jax.random.key(7), 16)
  for _ in range(3):
    new, m = step(state, prompt, valid)
    assert float(m['skipped']) == 0
    # Eq. 18 on the adapter tree: anchor' = (1 - eta) anchor + eta policy'.
    jax.tree.map(
      lambda a0, p1, a1: np.testing.assert_allclose(a1, (1 - ETA) * a0 + ETA * p1, rtol=1e-6),
      state.anchor_params,
      new.params,
      new.anchor_params,
    )
    state = new
  jax.tree.map(np.testing.assert_array_equal, state.ref_params, tiny_params)  # bit for bit
  moved = [float(jnp.abs(x).max()) for x in jax.tree.leaves(lora.split(state.params)[1])]
  assert state.params.keys() == adapters.keys() and max(moved) > 0
  b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(state.params) if p[-1].key == 'b']
  assert all(float(jnp.abs(b).max()) > 0 for b in b_leaves)  # every b left zero
