"""The decode layout (`decode_layout.py`) and the one-pass draw: the same values as the
training layout and as the sampler they replaced.

The reference sampler below is the sampler as it stood before them: the training layout
(scanned layers decoded as a scan), a log-softmax for each token's log-probability, and the
two-level inverse-CDF draw over exp(logits - max). The sampler must draw the same tokens
with the same keys and give the same log-probabilities to float32 rounding.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decode_layout, presets, sampling
from bond_jax.models import decoder as model_lib
from tests.models.test_sampling import _left_padded_prompts, _stack_layers

_sequence_logprobs = jax.jit(sampling.sequence_logprobs, static_argnums=0)

# Small models of each family the decoder covers, with mixed local / global layers where the
# family has them (a 3-token window, so it bites at these lengths).
FAMILIES = {
  'gemma': dict(num_kv_heads=1),
  'gemma2': dict(
    num_kv_heads=2,
    layer_types=('local', 'global', 'local'),
    sliding_window=3,
    attn_logit_softcap=5.0,
    final_logit_softcap=3.0,
    use_post_norms=True,
    query_pre_attn_scalar=16,
  ),
  'gemma3': dict(
    num_kv_heads=2,
    layer_types=('local', 'local', 'global'),
    sliding_window=3,
    use_post_norms=True,
    use_qk_norm=True,
    rope_base=10_000.0,
    rope_local_base=100.0,
    rope_scale=2.0,
  ),
}


def _config(family: str, scan_layers: bool) -> model_lib.ModelConfig:
  return presets.preset(
    'tiny',
    num_layers=3,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    head_dim=8,
    scan_layers=scan_layers,
    **FAMILIES[family],
  )


def _init_params(cfg: model_lib.ModelConfig, seed: int):
  """Random training-layout parameters of `cfg`. A scanned model gets the unrolled model's
  weights stacked over layers ('layers/...', the structure `init_params` gives it, as
  tests/models/test_sampling.py checks): initialising it directly compiles a scan of the
  whole init, about 1.5 s per config, for weights nothing here needs to be born stacked."""
  params = model_lib.init_params(
    dataclasses.replace(cfg, scan_layers=False), jax.random.PRNGKey(seed)
  )
  return _stack_layers(cfg, params) if cfg.scan_layers else params


@functools.partial(jax.jit, static_argnums=0)
def _both_layouts_logits(cfg, params, dparams, tokens_BxT, valid_BxT):
  """(the training layout's full-sequence logits, the decode layout's, the decode layout's
  cached logits: a 3-token prefill, then one token at a time), all in one program: one
  compilation per config where separate programs took four. The steps are a scan (step t
  traced, as the sampler's loop has it), each one query against the cache."""
  full = model_lib.forward(cfg, params, tokens_BxT, valid_BxT)
  dcfg = decode_layout.decode_config(cfg)
  decoder = model_lib.Decoder(dcfg, gate_up=decode_layout.is_decode_layout(dparams))
  apply = lambda *args: decoder.apply({'params': dparams}, *args)
  positions_BxT, mask_BxTxT = model_lib.sequence_inputs(valid_BxT)
  decoded, _ = apply(tokens_BxT, positions_BxT, mask_BxTxT, None, 0)
  b, n = tokens_BxT.shape
  cache = model_lib.init_cache(dcfg, b, n)
  mask_Bx3xT = model_lib.attention_mask(jnp.arange(3), valid_BxT)
  prefill_Bx3xV, cache = apply(tokens_BxT[:, :3], positions_BxT[:, :3], mask_Bx3xT, cache, 0)

  def step(cache, t):
    token_Bx1, position_Bx1 = (
      jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1) for x in (tokens_BxT, positions_BxT)
    )
    mask_Bx1xT = model_lib.attention_mask(t + jnp.arange(1), valid_BxT)
    logits_Bx1xV, cache = apply(token_Bx1, position_Bx1, mask_Bx1xT, cache, t)
    return cache, logits_Bx1xV[:, 0]

  _, steps_TxBxV = jax.lax.scan(step, cache, jnp.arange(3, n, dtype=jnp.int32))
  cached = jnp.concatenate([prefill_Bx3xV, jnp.moveaxis(steps_TxBxV, 0, 1)], axis=1)
  return full, decoded, cached


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_decode_layout_gives_the_training_layout_logits(family, scan_layers):
  """Full-sequence logits of the decode layout (unrolled layers: gate/up stacked; scanned
  layers: kept stacked) equal the training layout's, and so do its cached logits fed one
  token at a time (the one-query attention path), to float32 rounding."""
  cfg = _config(family, scan_layers)
  params = _init_params(cfg, 1)
  dparams = sampling.decode_params(params, None)
  assert not decode_layout.is_decode_layout(params)
  if scan_layers:  # decoded as trained: a scan over the stacked layers
    assert not decode_layout.is_decode_layout(dparams) and 'layers' in dparams
    assert jax.tree.structure(dparams) == jax.tree.structure(params)
  else:
    assert decode_layout.is_decode_layout(dparams)
    assert dparams['layer_2']['mlp']['gate_up_proj']['kernel'].shape == (32, 2, 64)
  tokens, valid = _left_padded_prompts(cfg.vocab_size, [8, 5, 2], 8)
  full, decoded, cached = _both_layouts_logits(cfg, params, dparams, tokens, valid)
  np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)
  cached = np.asarray(cached)[np.asarray(valid)]
  np.testing.assert_allclose(cached, np.asarray(full)[np.asarray(valid)], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The sampler before the decode layout and the one-pass draw, for comparison.


def _reference_inverse_cdf(logits_BxV, u_B, block=128):
  """The two-level inverse-CDF draw over exp(logits - max) that `sampling` used before."""
  b, v = logits_BxV.shape
  num_blocks = -(-v // block)
  mass_BxV = jnp.exp(logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True))
  mass_BxNxK = jnp.pad(mass_BxV, ((0, 0), (0, num_blocks * block - v))).reshape(
    b, num_blocks, block
  )
  cdf_BxN = jnp.cumsum(mass_BxNxK.sum(-1), axis=-1)
  total_B = cdf_BxN[:, -1]
  target_B = jnp.minimum(u_B * total_B, jnp.nextafter(total_B, 0.0))
  block_B = jnp.minimum(jnp.sum(cdf_BxN <= target_B[:, None], axis=-1), num_blocks - 1)
  before_B = jnp.where(
    block_B > 0, jnp.take_along_axis(cdf_BxN, jnp.maximum(block_B - 1, 0)[:, None], -1)[:, 0], 0.0
  )
  within_BxK = jnp.take_along_axis(mass_BxNxK, block_B[:, None, None], axis=1)[:, 0]
  index_B = jnp.sum(jnp.cumsum(within_BxK, axis=-1) <= (target_B - before_B)[:, None], axis=-1)
  last_B = block - 1 - jnp.argmax((within_BxK > 0)[:, ::-1], axis=-1)
  return (block_B * block + jnp.minimum(index_B, last_B)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reference_sample(cfg, g, params, prompt_BxP, valid_BxP, rng):
  """One sample per prompt, `g` tokens, no EOS, on the training layout (a scan over layers
  decodes as a scan), each token's log-probability from a log-softmax. The decode steps are
  a `lax.scan` (step t traced, as in the sampler's loop): the same values as a Python loop
  over the steps, which would unroll `g` decoders into the program and compile several
  times slower."""
  decoder = model_lib.Decoder(cfg)
  b, p = prompt_BxP.shape
  cache = model_lib.init_cache(cfg, b, p + g)
  key_valid_BxS = jnp.concatenate([valid_BxP, jnp.ones((b, g), bool)], axis=1)
  logits_BxV, cache = decoder.apply(
    {'params': params},
    prompt_BxP,
    model_lib.positions_from_mask(valid_BxP),
    model_lib.attention_mask(jnp.arange(p), key_valid_BxS),
    cache,
    0,
    method=model_lib.Decoder.last_logits,
  )
  prompt_len_B = valid_BxP.sum(axis=-1).astype(jnp.int32)

  def step(carry, t):
    logits_BxV, cache = carry
    keys_B = sampling.row_keys(rng, t, jnp.arange(b))
    token_B = _reference_inverse_cdf(logits_BxV, jax.vmap(jax.random.uniform)(keys_B))
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    logits_Bx1xV, cache = decoder.apply(
      {'params': params},
      token_B[:, None],
      (prompt_len_B + t)[:, None],
      model_lib.attention_mask(p + t + jnp.arange(1), key_valid_BxS),
      cache,
      p + t,
    )
    return (logits_Bx1xV[:, 0], cache), (token_B, logp_B)

  _, (tokens_GxB, logps_GxB) = jax.lax.scan(
    step, (logits_BxV, cache), jnp.arange(g, dtype=jnp.int32)
  )
  return tokens_GxB.T, logps_GxB.T


@pytest.mark.parametrize(
  'family,scan_layers', [('gemma', False), ('gemma2', True), ('gemma3', False), ('gemma3', True)]
)
def test_sampler_draws_what_the_reference_sampler_draws(family, scan_layers):
  """Same keys, same tokens; log-probabilities equal to float32 rounding. The draw's one
  pass gives the same cumulative masses as the reference's two up to rounding, so a token
  could differ only for a uniform within ~1e-6 of a boundary between two tokens."""
  cfg = dataclasses.replace(_config(family, scan_layers), vocab_size=300)  # 3 blocks, 1 partial
  params = _init_params(cfg, 2)
  prompt, valid = _left_padded_prompts(cfg.vocab_size, [6, 3, 1, 4], 6, seed=1)
  rng = jax.random.PRNGKey(7)
  want_tokens, want_logp = _reference_sample(cfg, 10, params, prompt, valid, rng)
  sp = sampling.SamplingParams(max_new_tokens=10)
  out = sampling.sample_jit(cfg, params, prompt, valid, rng, sp)
  np.testing.assert_array_equal(out.tokens_BxG, want_tokens)
  np.testing.assert_allclose(out.logprobs_BxG, want_logp, rtol=1e-5, atol=1e-5)
  # The decode layout made beforehand (as the training step does) draws the same samples.
  made = sampling.sample_jit(cfg, sampling.decode_params(params, None), prompt, valid, rng, sp)
  np.testing.assert_array_equal(made.tokens_BxG, out.tokens_BxG)
  np.testing.assert_array_equal(made.logprobs_BxG, out.logprobs_BxG)


@pytest.mark.parametrize('temperature,top_k', [(0.0, 0), (0.7, 5)])
def test_logprobs_are_the_models_when_the_draw_is_not(tiny_cfg, tiny_params, temperature, top_k):
  """Greedy, tempered and truncated draws still report log pi at temperature 1 (their own
  log-sum-exp over the raw logits): equal to the teacher-forced log-likelihoods."""
  prompt, valid = _left_padded_prompts(tiny_cfg.vocab_size, [5, 2], 5)
  sp = sampling.SamplingParams(max_new_tokens=6, temperature=temperature, top_k=top_k)
  out = sampling.sample_jit(tiny_cfg, tiny_params, prompt, valid, jax.random.PRNGKey(4), sp)
  forced = _sequence_logprobs(tiny_cfg, tiny_params, prompt, valid, out.tokens_BxG, out.mask_BxG)
  np.testing.assert_allclose(out.logprobs_BxG, forced, rtol=1e-5, atol=1e-5)


def test_the_draws_logsumexp_is_the_softmax_normaliser():
  """The log-sum-exp from the draw's block statistics equals jax.nn.logsumexp: a vocabulary
  that is not a multiple of the block, masked tokens (as top-k leaves them), a peaked row,
  and a row of large logits (where exp without a max would overflow)."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 300)).astype(np.float32)
  logits[1, rng.choice(300, 250, replace=False)] = np.finfo(np.float32).min
  logits[2] *= 30.0
  logits[3] += 1e4
  logits = jnp.asarray(logits)
  u = jax.random.uniform(jax.random.PRNGKey(0), (4,))
  tokens, lse = jax.jit(sampling.logsumexp_and_draw)(logits, u)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(sampling.logsumexp)(logits), lse, rtol=1e-6)
  np.testing.assert_array_equal(tokens, _reference_inverse_cdf(logits, u))
  assert float(logits[1, int(tokens[1])]) > np.finfo(np.float32).min
  # Both ways of taking the block statistics (one pass on a GPU, two elsewhere) agree.
  one = jax.jit(sampling.block_stats_one_pass, static_argnums=1)(logits, 128)
  two = jax.jit(sampling.block_stats_two_pass, static_argnums=1)(logits, 128)
  np.testing.assert_array_equal(one[0], two[0])
  mass = lambda stats: stats[1] * jnp.exp(stats[0] - stats[0].max(-1, keepdims=True))
  np.testing.assert_allclose(mass(one), mass(two), rtol=1e-6, atol=1e-30)


def test_decoding_in_segments_that_read_the_cache_in_use_changes_no_sample():
  """Segments of decode steps attending to the cache only up to their last slot (3 uneven
  segments, the local layers' window measured inside the narrower mask, rows stopping at EOS
  in different segments) draw what one segment over the whole cache draws.

  Gemma 2 alone: its layers are local, global, local, so both the windowed and the plain
  attention read a cache cut to the segment (the only code the segments change: the slice
  of the cache in `attention.Attention` and of the key mask in `sampling.sample`); a Gemma 1
  model (all global, one KV head) takes no path that one does not."""
  cfg = _config('gemma2', False)
  params = _init_params(cfg, 3)
  prompt, valid = _left_padded_prompts(cfg.vocab_size, [6, 3, 1, 4], 6, seed=2)
  rng = jax.random.PRNGKey(11)
  whole = sampling.SamplingParams(max_new_tokens=10, eos_id=5, cache_segments=1)
  split = dataclasses.replace(whole, cache_segments=3)
  assert split.segment_ends() == [4, 7, 10] and whole.segment_ends() == [10]
  a = sampling.sample_jit(cfg, params, prompt, valid, rng, whole, num_samples=2)
  b = sampling.sample_jit(cfg, params, prompt, valid, rng, split, num_samples=2)
  assert not bool(a.mask_BxG.all())  # some rows stopped early
  np.testing.assert_array_equal(b.tokens_BxG, a.tokens_BxG)
  np.testing.assert_array_equal(b.mask_BxG, a.mask_BxG)
  np.testing.assert_allclose(b.logprobs_BxG, a.logprobs_BxG, rtol=1e-6, atol=1e-6)
  assert int(b.num_steps) == int(a.num_steps)
  # The automatic choice: one segment per 64 new tokens, at most 4.
  auto = [sampling.SamplingParams(max_new_tokens=g).segment_ends() for g in (10, 128, 256, 1024)]
  assert auto == [[10], [64, 128], [64, 128, 192, 256], [256, 512, 768, 1024]]
