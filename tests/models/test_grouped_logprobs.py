"""`sampling.grouped_sequence_logprobs` (each prompt read once for its R responses) against
`sequence_logprobs` of the same rows with the prompt repeated: the same log-probabilities and
the same gradients, for left-padded prompts, responses cut short by EOS, Gemma 2's local
layers and soft caps, scanned layers, and log-probs a chunk of positions at a time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import presets, sampling

B, R, P, G = 3, 2, 6, 4
SMALL = dict(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=2, head_dim=8)
FAMILIES = {
  'gemma': {},
  'gemma2_local': dict(
    layer_types=('local', 'global'),
    sliding_window=3,
    attn_logit_softcap=5.0,
    final_logit_softcap=3.0,
    use_post_norms=True,
  ),
  'scanned': dict(scan_layers=True),
}


def _rows():
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, 256, (B, P)).astype(np.int32)
  valid = np.ones((B, P), bool)
  valid[0, :3] = valid[1, :1] = False  # left padding
  response = rng.integers(3, 256, (B, R, G)).astype(np.int32)
  mask = np.ones((B, R, G), bool)
  mask[0, 1, 2:] = mask[2, 0, 1:] = False  # ended by EOS
  return prompt, valid, response, mask


@functools.partial(jax.jit, static_argnums=(0, 1))
def _both(cfg, chunk, params, prompt, valid, response, mask):
  """(grouped, per row) log-probs [B, R, G] and the gradients of their masked sums."""

  def grouped(params):
    return sampling.grouped_sequence_logprobs(cfg, params, prompt, valid, response, mask, chunk)

  def per_row(params):
    rep = lambda x: jnp.repeat(x, R, axis=0)
    flat = lambda x: x.reshape(B * R, G)
    out = sampling.sequence_logprobs(
      cfg, params, rep(prompt), rep(valid), flat(response), flat(mask), chunk
    )
    return out.reshape(B, R, G)

  probe = jnp.arange(1, R + 1, dtype=jnp.float32)[None, :, None]  # weigh responses apart
  grad = lambda f: jax.grad(lambda p: jnp.sum(probe * f(p)))(params)
  return grouped(params), per_row(params), grad(grouped), grad(per_row)


@pytest.mark.parametrize(
  'family,chunk', [('gemma', 0), ('gemma', 2), ('gemma2_local', 0), ('scanned', 0)]
)
def test_grouped_equals_per_row(family, chunk):
  cfg = presets.preset('tiny', vocab_size=256, **SMALL, **FAMILIES[family])
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  prompt, valid, response, mask = _rows()
  got, want, got_grads, want_grads = _both(cfg, chunk, params, prompt, valid, response, mask)
  assert np.all(np.asarray(got)[~mask] == 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    h = functools.reduce(lambda t, k: t[k.key], path, want_grads)
    scale = float(np.abs(np.asarray(h)).max())
    assert scale > 0, jax.tree_util.keystr(path)  # every weight gets a gradient
    np.testing.assert_allclose(g, h, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
