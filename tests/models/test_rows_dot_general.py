"""`layers.rows_dot_general`, the Dense layers' product on merged rows, against
`lax.dot_general` itself: the same values and the same gradients, for every contraction the
decoder's layers use, and unchanged behaviour for the contractions it does not rewrite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import layers

# (lhs shape, rhs shape, contracted trailing axes of lhs): a Dense, q/k/v's DenseGeneral
# to (N, H), o_proj's DenseGeneral from (N, H), and the decode layout's stacked gate/up.
CASES = [
  ((2, 5, 8), (8, 16), 1),
  ((2, 5, 8), (8, 3, 4), 1),
  ((2, 5, 3, 4), (3, 4, 8), 2),
  ((2, 5, 8), (8, 2, 16), 1),
  ((7, 8), (8, 16), 1),  # one token per row (a decode step's last logits)
]


@pytest.mark.parametrize('lhs_shape,rhs_shape,c', CASES)
def test_values_and_gradients_match_dot_general(lhs_shape, rhs_shape, c):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, lhs_shape)
  w = jax.random.normal(kw, rhs_shape)
  dims = ((tuple(range(x.ndim - c, x.ndim)), tuple(range(c))), ((), ()))
  out_shape = lhs_shape[: len(lhs_shape) - c] + rhs_shape[c:]
  probe = jax.random.normal(kg, out_shape)  # a random cotangent
  loss = lambda f: lambda x, w: jnp.sum(probe * f(x, w, dims))
  want, want_grads = jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)
  got, got_grads = jax.value_and_grad(loss(layers.rows_dot_general), argnums=(0, 1))(x, w)
  assert layers.rows_dot_general(x, w, dims).shape == out_shape
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, h in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)


def test_other_contractions_pass_through():
  """A batched product, or one contracting a leading axis, is `lax.dot_general`'s."""
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  y = jnp.arange(2 * 4 * 5, dtype=jnp.float32).reshape(2, 4, 5)
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(
    layers.rows_dot_general(x, y, batched), jax.lax.dot_general(x, y, batched)
  )
  z = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6)
  leading = (((0,), (0,)), ((), ()))
  np.testing.assert_array_equal(
    layers.rows_dot_general(x, z, leading), jax.lax.dot_general(x, z, leading)
  )


def test_the_decoder_uses_it():
  """The gradient of the decoder's log-likelihood is the same with every Dense layer on
  rows as with Flax's default product (the layers' own `dot_general` swapped back)."""
  cfg = model_lib.ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=16, hidden_dim=32, num_heads=2, num_kv_heads=1,
    head_dim=8,
  )  # fmt: skip
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 6), 0, 64)
  valid = jnp.ones((3, 6), bool)

  def loglik(params):
    logits = model_lib.forward(cfg, params, tokens, valid)
    return jnp.sum(jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(tokens[:, 1:], 64))

  calls = []

  def counting(*args, **kw):
    calls.append(1)
    return jax.lax.dot_general(*args, **kw)

  with pytest.MonkeyPatch.context() as mp:  # Flax's default product, counted
    mp.setattr(layers, 'rows_dot_general', counting)
    want = jax.grad(loglik)(params)
  assert calls, 'no Dense layer of the decoder goes through rows_dot_general'
  got = jax.grad(loglik)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    h = want
    for key in path:
      h = h[key.key]
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
