"""Sampler and log-likelihood tests: cache vs full forward, sampler vs teacher forcing, masks.

Everything runs jitted, as in training, through module-level jits with the model config
and sampler settings static: each (config, settings, shapes) compiles once, and tests
that share one reuse it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import presets, sampling

PAD, EOS = 0, 1

_forward = jax.jit(model_lib.forward, static_argnums=0)
_sequence_logprobs = jax.jit(sampling.sequence_logprobs, static_argnums=0)
_sample = sampling.sample_jit
# Greedy decoding of 6 tokens: the EOS and truncation tests here and test_decode_layout's
# greedy case all draw it for 2 prompts of width 5, so the one compiled sampler serves all.
_GREEDY = sampling.SamplingParams(max_new_tokens=6, temperature=0.0)


@functools.partial(jax.jit, static_argnums=0)
def _full_and_cached_logits(cfg, params, tokens_BxT, valid_BxT):
  """(full-sequence logits, cached logits: a 4-token prefill, then one token at a time) in
  one program, one compilation per config. The steps are a scan (step t traced), each one
  query against the cache."""
  full = model_lib.forward(cfg, params, tokens_BxT, valid_BxT)
  decoder = model_lib.Decoder(cfg)
  b, n = tokens_BxT.shape
  cache = model_lib.init_cache(cfg, b, n)
  positions_BxT = model_lib.positions_from_mask(valid_BxT)
  mask_Bx4xT = model_lib.attention_mask(jnp.arange(4), valid_BxT)
  prefill_Bx4xV, cache = decoder.apply(
    {'params': params}, tokens_BxT[:, :4], positions_BxT[:, :4], mask_Bx4xT, cache, 0
  )

  def step(cache, t):
    token_Bx1, position_Bx1 = (
      jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1) for x in (tokens_BxT, positions_BxT)
    )
    mask_Bx1xT = model_lib.attention_mask(t + jnp.arange(1), valid_BxT)
    logits_Bx1xV, cache = decoder.apply(
      {'params': params}, token_Bx1, position_Bx1, mask_Bx1xT, cache, t
    )
    return cache, logits_Bx1xV[:, 0]

  _, steps_TxBxV = jax.lax.scan(step, cache, jnp.arange(4, n, dtype=jnp.int32))
  return full, jnp.concatenate([prefill_Bx4xV, jnp.moveaxis(steps_TxBxV, 0, 1)], axis=1)


def _left_padded_prompts(vocab, lengths, width, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), width), np.int32)
  valid = np.zeros((len(lengths), width), bool)
  for i, n in enumerate(lengths):
    tokens[i, width - n :] = rng.integers(3, vocab, n)
    valid[i, width - n :] = True
  return jnp.asarray(tokens), jnp.asarray(valid)


@pytest.mark.parametrize('family', ['gemma', 'gemma2_local'])
def test_cached_decoding_equals_full_forward(tiny_cfg, family):
  cfg = tiny_cfg
  if family == 'gemma2_local':  # soft-capping, post-norms, a 3-token window on layer 0
    cfg = presets.preset(
      'tiny',
      num_layers=2,
      embed_dim=32,
      hidden_dim=64,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      layer_types=('local', 'global'),
      sliding_window=3,
      attn_logit_softcap=5.0,
      final_logit_softcap=3.0,
      use_post_norms=True,
      use_qk_norm=True,
    )
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  tokens, valid = _left_padded_prompts(cfg.vocab_size, [9, 5, 2], 9)
  # A 4-token prefill, then one token at a time (`_full_and_cached_logits`).
  full, cached = _full_and_cached_logits(cfg, params, tokens, valid)
  np.testing.assert_allclose(
    np.asarray(cached)[np.asarray(valid)], np.asarray(full)[np.asarray(valid)], rtol=1e-5, atol=1e-5
  )


def test_left_padding_does_not_change_logits(tiny_cfg, tiny_params):
  tokens, valid = _left_padded_prompts(tiny_cfg.vocab_size, [5], 5)
  wide = jnp.concatenate([jnp.full((1, 3), 7), tokens], axis=1)  # 3 pads with junk token ids
  wide_valid = jnp.concatenate([jnp.zeros((1, 3), bool), valid], axis=1)
  narrow_logits = _forward(tiny_cfg, tiny_params, tokens, valid)
  wide_logits = _forward(tiny_cfg, tiny_params, wide, wide_valid)[:, 3:]
  np.testing.assert_allclose(wide_logits, narrow_logits, rtol=1e-5, atol=1e-5)


def test_sampler_logprobs_equal_teacher_forced(tiny_cfg, tiny_params):
  prompt, valid = _left_padded_prompts(tiny_cfg.vocab_size, [6, 3, 1, 4], 6)
  sp = sampling.SamplingParams(max_new_tokens=12, eos_id=EOS, pad_id=PAD)
  out = _sample(tiny_cfg, tiny_params, prompt, valid, jax.random.PRNGKey(3), sp, num_samples=3)
  rep = lambda x: jnp.repeat(x, 3, axis=0)
  forced = _sequence_logprobs(
    tiny_cfg, tiny_params, rep(prompt), rep(valid), out.tokens_BxG, out.mask_BxG
  )
  assert out.mask_BxG.any()
  np.testing.assert_allclose(forced, out.logprobs_BxG, rtol=1e-5, atol=1e-5)
  assert jnp.all(out.logprobs_BxG[out.mask_BxG] < 0)


def test_eos_masks_the_rest_and_stops_early(tiny_cfg, tiny_params):
  # Two rows with the same real tokens (one left-padded) decode identically under greedy.
  # (The free run is `_GREEDY` on 2 prompts of width 5: the program other tests compile.)
  prompt = jnp.array([[0, 0, 5, 9, 4], [3, 8, 5, 9, 4]])
  valid = jnp.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
  free = _sample(
    tiny_cfg,
    tiny_params,
    prompt,
    valid,
    jax.random.PRNGKey(0),
    _GREEDY,
  )
  assert int(free.num_steps) == 6 and bool(free.mask_BxG.all())
  np.testing.assert_array_equal(free.tokens_BxG[0], free.tokens_BxG[1])
  # Call the token greedy decoding emits third "EOS": both rows stop right there.
  eos = int(free.tokens_BxG[0, 2])
  first = int(np.argmax(np.asarray(free.tokens_BxG[0]) == eos))
  out = _sample(
    tiny_cfg,
    tiny_params,
    prompt,
    valid,
    jax.random.PRNGKey(0),
    dataclasses.replace(_GREEDY, eos_id=eos, pad_id=PAD),
  )
  assert int(out.num_steps) == first + 1 < 6  # the loop ended early
  expected_mask = np.arange(6) <= first
  for row in range(2):
    np.testing.assert_array_equal(out.mask_BxG[row], expected_mask)
    np.testing.assert_array_equal(
      out.tokens_BxG[row, : first + 1], free.tokens_BxG[row, : first + 1]
    )
    assert (np.asarray(out.tokens_BxG[row, first + 1 :]) == PAD).all()
    assert (np.asarray(out.logprobs_BxG[row, first + 1 :]) == 0).all()


def test_sequence_logprobs_ignore_prompt_and_padding(tiny_cfg, tiny_params):
  # Prompts of width 5 and 6 response tokens: the shapes test_decode_layout scores (one
  # compiled program for both).
  prompt, valid = _left_padded_prompts(tiny_cfg.vocab_size, [4, 2], 5)
  response = jnp.array([[5, 6, 7, 3, 4, EOS], [8, EOS, PAD, PAD, PAD, PAD]])
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
  base = _sequence_logprobs(tiny_cfg, tiny_params, prompt, valid, response, mask)
  assert (base[1, 2:] == 0).all()
  # Changing what sits in padded slots (prompt or response) changes nothing.
  junk_prompt = jnp.where(valid, prompt, 9)
  junk_response = jnp.where(mask, response, 11)
  other = _sequence_logprobs(tiny_cfg, tiny_params, junk_prompt, valid, junk_response, mask)
  np.testing.assert_allclose(other, base, rtol=1e-6, atol=1e-6)
  # The prompt conditions the response but is never scored: a longer prompt of real tokens
  # still gives exactly G scored positions.
  assert base.shape == response.shape


@pytest.mark.parametrize('top_k,top_p', [(1, 1.0), (0, 1e-6)])
def test_truncation_to_one_token_is_greedy(tiny_cfg, tiny_params, top_k, top_p):
  prompt, valid = _left_padded_prompts(tiny_cfg.vocab_size, [5, 2], 5)  # `_GREEDY`'s shapes
  greedy = _sample(tiny_cfg, tiny_params, prompt, valid, jax.random.PRNGKey(0), _GREEDY)
  truncated = _sample(
    tiny_cfg,
    tiny_params,
    prompt,
    valid,
    jax.random.PRNGKey(5),
    sampling.SamplingParams(max_new_tokens=6, top_k=top_k, top_p=top_p),
  )
  np.testing.assert_array_equal(truncated.tokens_BxG, greedy.tokens_BxG)


def test_samples_follow_model_distribution(tiny_cfg, tiny_params):
  """First-token frequencies over many samples match the model's softmax."""
  # The prompt of the left-padding test: its `_forward` program serves here too.
  prompt, valid = _left_padded_prompts(tiny_cfg.vocab_size, [5], 5)
  sp = sampling.SamplingParams(max_new_tokens=1)
  out = _sample(tiny_cfg, tiny_params, prompt, valid, jax.random.PRNGKey(2), sp, num_samples=20_000)
  probs = jax.nn.softmax(_forward(tiny_cfg, tiny_params, prompt, valid)[0, -1])
  freq = np.bincount(np.asarray(out.tokens_BxG[:, 0]), minlength=tiny_cfg.vocab_size) / 20_000
  assert np.abs(freq - np.asarray(probs)).max() < 0.015


@pytest.mark.parametrize('scale', [1.0, 6.0])
def test_inverse_cdf_draws_pass_a_chi_square_test_against_the_softmax(scale):
  """One uniform per row, two-level search: counts of 60,000 draws from one row of 300
  logits (not a multiple of the 128-token block; 20 masked out as top-k does) against the
  softmax's expectation. scale 6 makes a peaked distribution with tiny tail masses."""
  from scipy import stats

  rng = np.random.default_rng(0)
  logits_V = (scale * rng.standard_normal(300)).astype(np.float32)
  masked = rng.choice(300, 20, replace=False)
  logits_V[masked] = np.finfo(np.float32).min
  n = 60_000
  u_N = jax.random.uniform(jax.random.PRNGKey(3), (n,))
  draw = jax.jit(sampling.inverse_cdf_sample)
  tokens = np.asarray(draw(jnp.broadcast_to(jnp.asarray(logits_V), (n, 300)), u_N))
  counts = np.bincount(tokens, minlength=300)
  assert counts[masked].sum() == 0  # zero mass is never drawn
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits_V)), np.float64)
  expected = probs * n
  big = expected >= 5  # pool the small bins (masked ones included), as the test requires

  def p_value(counts):
    observed = np.append(counts[big], counts[~big].sum())
    want = np.append(expected[big], expected[~big].sum())
    keep = want > 0
    scale = observed[keep].sum() / want[keep].sum()
    return stats.chisquare(observed[keep], want[keep] * scale).pvalue

  assert p_value(counts) > 1e-3, p_value(counts)
  # The test can fail: the same draws shifted by one token are rejected.
  assert p_value(np.bincount((tokens + 1) % 300, minlength=300)) < 1e-6


def test_inverse_cdf_edges():
  logits = jnp.log(jnp.array([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))
  logits = jnp.maximum(logits, jnp.finfo(jnp.float32).min)
  # Jitted: one compilation, where running it op by op compiled each of its operations.
  draw = jax.jit(sampling.inverse_cdf_sample, static_argnames='block')
  for u in (0.0, 0.4999, 0.5001, 1.0 - 2**-24):
    tokens = draw(logits, jnp.full((2,), u), block=2)
    assert int(tokens[0]) == (1 if u < 0.5 else 2) and int(tokens[1]) == 0


def test_a_decode_copy_in_the_activation_dtype_draws_the_same_samples(tiny_cfg, tiny_params):
  """bfloat16 activations with float32 weights: the layers cast each weight to bfloat16 before
  its matmul, so casting the weight matrices once beforehand changes no sample."""
  cfg = dataclasses.replace(tiny_cfg, dtype='bfloat16')
  prompt, valid = _left_padded_prompts(cfg.vocab_size, [3, 5], 6)
  sp = sampling.SamplingParams(max_new_tokens=8)
  rng = jax.random.PRNGKey(5)
  as_stored = _sample(cfg, tiny_params, prompt, valid, rng, sp, num_samples=4)
  copy = sampling.decode_params(tiny_params, 'bfloat16')
  assert copy['layer_0']['mlp']['gate_up_proj']['kernel'].dtype == jnp.bfloat16
  assert copy['layer_0']['pre_attn_norm']['scale'].dtype == jnp.float32
  cast_once = _sample(cfg, copy, prompt, valid, rng, sp, num_samples=4)
  np.testing.assert_array_equal(cast_once.tokens_BxG, as_stored.tokens_BxG)
  np.testing.assert_array_equal(cast_once.logprobs_BxG, as_stored.logprobs_BxG)


def _stack_layers(cfg, params):
  """Unrolled parameters ('layer_i/...') restacked as a scan over layers reads them."""
  layers = [params[f'layer_{i}'] for i in range(cfg.num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith('layer_')}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


@pytest.mark.parametrize('remat', ['none', 'block'])
def test_scanned_layers_equal_unrolled_ones(remat):
  """The same weights run as a scan over layers (mixed local / global layers with their own
  RoPE bases, so each layer's type is a traced input of the scan) give the unrolled model's
  logits, gradient, cached samples (several per prompt: the stacked cache is repeated along
  its batch axis) and teacher-forced log-likelihoods, to float32 rounding."""
  cfg = presets.preset(
    'tiny',
    num_layers=3,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    layer_types=('local', 'global', 'local'),
    sliding_window=3,
    rope_base=10_000.0,
    rope_local_base=100.0,
    rope_scale=2.0,
    use_qk_norm=True,
    use_post_norms=True,
  )
  scan = dataclasses.replace(cfg, scan_layers=True, remat=remat)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  stacked = _stack_layers(cfg, params)
  # The scanned model's own init, traced for its shapes only (compiling the scan of the init
  # would take longer than the rest of the checks that follow need of it).
  born = jax.eval_shape(lambda key: model_lib.init_params(scan, key), jax.random.PRNGKey(0))
  assert jax.tree.structure(born) == jax.tree.structure(stacked)
  assert born['layers']['attn']['q_proj']['kernel'].shape == (3, 32, 4, 8)

  tokens, valid = _left_padded_prompts(cfg.vocab_size, [9, 5, 2], 9)

  def loss(c, p):  # the logits come out beside the gradient: one program for both
    logits = model_lib.forward(c, p, tokens, valid)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3]), logits

  g_unrolled, logits_unrolled = jax.jit(jax.grad(lambda p: loss(cfg, p), has_aux=True))(params)
  g_scanned, logits_scanned = jax.jit(jax.grad(lambda p: loss(scan, p), has_aux=True))(stacked)
  np.testing.assert_allclose(logits_scanned, logits_unrolled, atol=2e-5)
  np.testing.assert_allclose(
    g_scanned['layers']['mlp']['up_proj']['kernel'],
    jnp.stack([g_unrolled[f'layer_{i}']['mlp']['up_proj']['kernel'] for i in range(3)]),
    rtol=1e-4,
    atol=1e-5,
  )

  sp = sampling.SamplingParams(max_new_tokens=6)
  rng = jax.random.PRNGKey(3)
  a = _sample(cfg, params, tokens, valid, rng, sp, num_samples=2)
  b = _sample(scan, stacked, tokens, valid, rng, sp, num_samples=2)
  np.testing.assert_array_equal(b.tokens_BxG, a.tokens_BxG)
  np.testing.assert_allclose(b.logprobs_BxG, a.logprobs_BxG, atol=2e-5)
  prompts = jnp.repeat(tokens, 2, axis=0), jnp.repeat(valid, 2, axis=0)
  np.testing.assert_allclose(
    _sequence_logprobs(scan, stacked, *prompts, b.tokens_BxG, b.mask_BxG),
    _sequence_logprobs(cfg, params, *prompts, a.tokens_BxG, a.mask_BxG),
    atol=5e-5,
  )


def test_a_decode_copy_of_scanned_layers_keeps_norm_scales(tiny_cfg, tiny_params):
  """Stacked norm scales [L, D] are 2-D but not weight matrices: they keep their dtype, and
  the copy stays stacked (a scanned model decodes as a scan) with the cast weights' values."""
  stacked = _stack_layers(tiny_cfg, tiny_params)
  copy = sampling.decode_params(stacked, 'bfloat16')
  assert jax.tree.structure(copy) == jax.tree.structure(stacked)
  assert copy['layers']['mlp']['gate_proj']['kernel'].dtype == jnp.bfloat16
  assert copy['layers']['pre_attn_norm']['scale'].dtype == jnp.float32
  unrolled = sampling.decode_params(tiny_params, 'bfloat16')
  for i in range(tiny_cfg.num_layers):
    layer = unrolled[f'layer_{i}']
    np.testing.assert_array_equal(
      copy['layers']['pre_attn_norm']['scale'][i], layer['pre_attn_norm']['scale']
    )
    gate_up = layer['mlp']['gate_up_proj']['kernel']  # [D, 2, F]
    np.testing.assert_array_equal(copy['layers']['mlp']['gate_proj']['kernel'][i], gate_up[:, 0])
    np.testing.assert_array_equal(copy['layers']['mlp']['up_proj']['kernel'][i], gate_up[:, 1])
