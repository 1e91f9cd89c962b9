"""Autoregressive sampling with a KV cache: prefill once, then a `lax.while_loop` decode.

Prompts are left-padded so that every row writes its next token into the same
cache slot. Parameters are an argument, never closed over, so the policy, the
anchor and the reference all run through the same compiled function.

The returned log-probabilities are those of the *model* (temperature 1, no
truncation) at the sampled tokens, i.e. log pi(y_t | x, y_<t): what the BOND
objectives and KL estimates need. With temperature 1 and no top-k / top-p they
are also the log-probabilities of the distribution that was sampled; with any
other setting, the samples no longer come from pi and the KL estimates built
from them are biased (the config and the metrics name the setting).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from bond_jax.models import decode_layout, xla_options
from bond_jax.models import decoder as model_lib
from bond_jax.types import PyTree


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. Hashable: passed to `jax.jit` as a static argument."""

  max_new_tokens: int  # G, the generation buffer length
  temperature: float = 1.0  # 0 means greedy
  top_k: int = 0  # 0 disables
  top_p: float = 1.0  # 1 disables
  eos_id: int | None = None  # None: always generate max_new_tokens
  pad_id: int = 0
  # Decode in this many segments of steps, each attending to the KV cache only up to the
  # last slot it writes (a shorter read per step; each segment is its own compiled loop
  # body). 0: one per 64 new tokens, at most 4.
  cache_segments: int = 0

  def segment_ends(self) -> list[int]:
    """The step each decode segment ends before (the last is max_new_tokens)."""
    g = self.max_new_tokens
    n = self.cache_segments or min(4, g // 64)
    n = max(1, min(n, g))
    return [-(-g * (j + 1) // n) for j in range(n)]

  @property
  def is_exact(self) -> bool:
    """True when samples come from the model's own distribution."""
    return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


@struct.dataclass
class SampleOutput:
  tokens_BxG: jax.Array  # sampled tokens; pad_id after EOS
  mask_BxG: jax.Array  # True at generated positions (EOS included)
  logprobs_BxG: jax.Array  # log pi(y_t | ...) at temperature 1; 0 where mask is False
  num_steps: jax.Array  # decode iterations run (< max_new_tokens when all rows hit EOS)


@struct.dataclass
class _DecodeState:
  step: jax.Array  # number of tokens generated so far
  last_logits_BxV: jax.Array
  tokens_BxG: jax.Array
  mask_BxG: jax.Array
  logprobs_BxG: jax.Array
  done_B: jax.Array
  cache: model_lib.Cache
  rng: jax.Array


def _process_logits(logits_BxV: jax.Array, sp: SamplingParams) -> jax.Array:
  """Logits of the distribution actually sampled (temperature, top-k, top-p)."""
  logits_BxV = logits_BxV / sp.temperature
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if sp.top_k > 0:
    kth_BxV = jax.lax.top_k(logits_BxV, sp.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_BxV, neg_inf, logits_BxV)
  if sp.top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    keep_BxV = (cum_BxV - jax.nn.softmax(sorted_BxV, axis=-1)) < sp.top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, neg_inf, logits_BxV)
  return logits_BxV


def _blocks(logits_BxV: jax.Array, block: int) -> jax.Array:
  """[B, N, block]: V padded to N * block with the dtype's minimum (zero mass)."""
  b, v = logits_BxV.shape
  num_blocks = -(-v // block)
  low = jnp.finfo(logits_BxV.dtype).min
  pad = ((0, 0), (0, num_blocks * block - v))
  return jnp.pad(logits_BxV, pad, constant_values=low).reshape(b, num_blocks, block)


def block_stats_two_pass(logits_BxV: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """`_block_stats` as two reductions (each block's max, then its sum of exp(logit - max)):
  two passes over the logits, each vectorised (on a CPU, several times faster than one pass
  of (max, sum) pairs, whose combination is scalar code there)."""
  logits_BxNxK = _blocks(logits_BxV, block)
  max_BxN = jnp.max(logits_BxNxK, axis=-1)
  return max_BxN, jnp.sum(jnp.exp(logits_BxNxK - max_BxN[..., None]), axis=-1)


def block_stats_one_pass(logits_BxV: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """`_block_stats` as one reduction whose elements are (max, sum) pairs, combined as an
  online softmax combines them: one pass over the logits (one kernel on a GPU, which the
  two reductions take two of), one exp per element."""
  logits_BxNxK = _blocks(logits_BxV, block)

  def combine(x, y):
    (m1, s1), (m2, s2) = x, y
    m = jnp.maximum(m1, m2)
    # The smaller side's scale exp(smaller - larger); 1 for a tie (also two -infs).
    scale = jnp.exp(jnp.where(m1 == m2, 0.0, jnp.minimum(m1, m2) - m))
    return m, jnp.where(m1 >= m2, s1 + s2 * scale, s1 * scale + s2)

  dtype = logits_BxV.dtype
  init = (jnp.asarray(jnp.finfo(dtype).min, dtype), jnp.asarray(0.0, dtype))
  ones_BxNxK = jnp.where(logits_BxNxK > init[0], 1.0, 0.0).astype(dtype)
  return jax.lax.reduce((logits_BxNxK, ones_BxNxK), init, combine, (2,))


def _block_stats(logits_BxV: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """(max_BxN, sumexp_BxN) over blocks of `block` tokens, sumexp = the sum of exp(logit -
  the block's max); V is padded to N * block with zero mass. One pass on a GPU, two
  vectorised ones elsewhere (the values agree to float32 rounding)."""
  return jax.lax.platform_dependent(
    logits_BxV,
    cuda=lambda x: block_stats_one_pass(x, block),
    rocm=lambda x: block_stats_one_pass(x, block),
    default=lambda x: block_stats_two_pass(x, block),
  )


def logsumexp_and_draw(
  logits_BxV: jax.Array, u_B: jax.Array, block: int = 128
) -> tuple[jax.Array, jax.Array]:
  """(token_B, logsumexp_B): the token whose cumulative softmax mass first exceeds u_B
  (uniform in [0, 1)) of the total, an exact draw from softmax(logits) up to float32
  rounding from one uniform per row (Gumbel-max needs V), and the log of the softmax's
  normaliser, so that log p(token) = logit - logsumexp needs no other pass over [B, V].

  Two levels, so every cumulative sum is short (and so accurate): a pass over the logits
  gives each block of `block` tokens its max and mass (`_block_stats`); the draw picks the
  block holding the target mass, then the token within it from that block's `block` logits
  alone. Tokens of zero mass (logits at the dtype's minimum, e.g. outside top-k) are never
  returned."""
  logits_BxV = jax.lax.stop_gradient(logits_BxV)  # a draw has no gradient (as argmax)
  b, v = logits_BxV.shape
  max_BxN, sumexp_BxN = _block_stats(logits_BxV, block)
  num_blocks = max_BxN.shape[1]
  max_B = jnp.max(max_BxN, axis=-1)
  cdf_BxN = jnp.cumsum(sumexp_BxN * jnp.exp(max_BxN - max_B[:, None]), axis=-1)
  total_B = cdf_BxN[:, -1]
  target_B = jnp.minimum(u_B * total_B, jnp.nextafter(total_B, 0.0))
  block_B = jnp.minimum(jnp.sum(cdf_BxN <= target_B[:, None], axis=-1), num_blocks - 1)
  before_B = jnp.where(
    block_B > 0, jnp.take_along_axis(cdf_BxN, jnp.maximum(block_B - 1, 0)[:, None], -1)[:, 0], 0.0
  )
  index_BxK = block_B[:, None] * block + jnp.arange(block)
  in_vocab_BxK = index_BxK < v
  logit_BxK = jnp.take_along_axis(logits_BxV, jnp.minimum(index_BxK, v - 1), axis=-1)
  within_BxK = jnp.where(in_vocab_BxK, jnp.exp(logit_BxK - max_B[:, None]), 0.0)
  index_B = jnp.sum(jnp.cumsum(within_BxK, axis=-1) <= (target_B - before_B)[:, None], axis=-1)
  # Rounding can put the target past the block's own sum: take its last token with mass.
  last_B = block - 1 - jnp.argmax((within_BxK > 0)[:, ::-1], axis=-1)
  token_B = (block_B * block + jnp.minimum(index_B, last_B)).astype(jnp.int32)
  return token_B, max_B + jnp.log(total_B)


def inverse_cdf_sample(logits_BxV: jax.Array, u_B: jax.Array, block: int = 128) -> jax.Array:
  """The token of `logsumexp_and_draw`: an exact draw from softmax(logits) (up to float32
  rounding) from one uniform u_B per row."""
  return logsumexp_and_draw(logits_BxV, u_B, block)[0]


def logsumexp(logits_BxV: jax.Array, block: int = 128) -> jax.Array:
  """log sum exp over the last axis, from the block statistics of the draw."""
  max_BxN, sumexp_BxN = _block_stats(logits_BxV, block)
  max_B = jnp.max(max_BxN, axis=-1)
  return max_B + jnp.log(jnp.sum(sumexp_BxN * jnp.exp(max_BxN - max_B[:, None]), axis=-1))


def _choose(
  logits_BxV: jax.Array, keys_B: jax.Array, sp: SamplingParams
) -> tuple[jax.Array, jax.Array]:
  """(token_B, log pi(token_B)): one token per row, row b drawing with its own key keys_B[b],
  and its log-probability under the model (temperature 1, no truncation). Sampling exactly
  from the model takes one pass over the logits for both on a GPU (`_block_stats`); other
  settings take one more for the log-probability."""
  if sp.temperature == 0.0:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    lse_B = logsumexp(logits_BxV)
  else:
    u_B = jax.vmap(jax.random.uniform)(keys_B)
    token_B, lse_B = logsumexp_and_draw(_process_logits(logits_BxV, sp), u_B)
    if not sp.is_exact:
      lse_B = logsumexp(logits_BxV)
  logit_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0]
  return token_B, logit_B - lse_B


def row_keys(rng: jax.Array, step: jax.Array, rows_B: jax.Array) -> jax.Array:
  """The key of each row at decode step `step`: a function of (rng, step, global row index)
  only, so a row draws the same tokens whether its prompt is sampled alone, in a micro-batch
  or in the whole batch."""
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, rows_B)


def sample(
  cfg: model_lib.ModelConfig,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  rng: jax.Array,
  sp: SamplingParams,
  num_samples: int = 1,
  prompt_ids_B: jax.Array | None = None,
) -> SampleOutput:
  """Draw `num_samples` generations per prompt.

  The prompt is prefilled once (only its last position's logits are built) and its cache
  rows are repeated, so the samples of one prompt share that work. Output rows are
  prompt-major: row b * num_samples + j is sample j of prompt b. Its randomness is keyed by
  prompt_ids_B[b] * num_samples + j (`row_keys`; prompt_ids_B defaults to 0..B-1, the
  prompts' indices in the whole batch), so sampling a batch in micro-batches of prompts
  gives the same samples as sampling it whole. Each prompt needs at least one real token.
  The loop stops as soon as every row has emitted EOS.
  """
  # Prefill and decode run on the decode layout (unrolled layers: gate/up stacked; stacked
  # layers: as trained), made here unless the caller made it once already (`decode_params`).
  # LoRA adapters, if `params` has them: folded in, or kept with scanned layers.
  params = decode_layout.for_decoding(cfg, params)
  cfg = decode_layout.decode_config(cfg)
  decoder = model_lib.Decoder(cfg, gate_up=decode_layout.is_decode_layout(params))
  b, p = prompt_BxP.shape
  g = sp.max_new_tokens
  prompt_valid_BxP = prompt_valid_BxP.astype(bool)

  # Prefill the prompt into a cache with room for the generation.
  cache = model_lib.init_cache(cfg, b, p + g)
  key_valid_BxS = jnp.concatenate([prompt_valid_BxP, jnp.ones((b, g), bool)], axis=1)
  positions_BxP = model_lib.positions_from_mask(prompt_valid_BxP)
  mask_BxPxS = model_lib.attention_mask(jnp.arange(p), key_valid_BxS)
  logits_BxV, cache = decoder.apply(
    {'params': params},
    prompt_BxP,
    positions_BxP,
    mask_BxPxS,
    cache,
    0,
    method=model_lib.Decoder.last_logits,
  )
  prompt_len_B = prompt_valid_BxP.sum(axis=-1).astype(jnp.int32)

  if num_samples > 1:
    rep = lambda x: jnp.repeat(x, num_samples, axis=0)
    cache = model_lib.repeat_cache(cfg, cache, num_samples)
    logits_BxV, key_valid_BxS, prompt_len_B = map(rep, (logits_BxV, key_valid_BxS, prompt_len_B))
    b = b * num_samples
  if prompt_ids_B is None:
    prompt_ids_B = jnp.arange(b // num_samples)
  rows_B = (prompt_ids_B[:, None] * num_samples + jnp.arange(num_samples)).reshape(-1)

  init = _DecodeState(
    step=jnp.zeros((), jnp.int32),
    last_logits_BxV=logits_BxV,
    tokens_BxG=jnp.full((b, g), sp.pad_id, jnp.int32),
    mask_BxG=jnp.zeros((b, g), bool),
    logprobs_BxG=jnp.zeros((b, g), jnp.float32),
    done_B=jnp.zeros((b,), bool),
    cache=cache,
    rng=rng,
  )

  def body(s: _DecodeState, key_valid_BxS: jax.Array) -> _DecodeState:
    token_B, logp_B = _choose(s.last_logits_BxV, row_keys(s.rng, s.step, rows_B), sp)
    live_B = ~s.done_B
    token_B = jnp.where(live_B, token_B, sp.pad_id)
    done_B = s.done_B if sp.eos_id is None else s.done_B | (token_B == sp.eos_id)
    t = s.step
    tokens_BxG = jax.lax.dynamic_update_slice(s.tokens_BxG, token_B[:, None], (0, t))
    mask_BxG = jax.lax.dynamic_update_slice(s.mask_BxG, live_B[:, None], (0, t))
    logprobs_BxG = jax.lax.dynamic_update_slice(
      s.logprobs_BxG, jnp.where(live_B, logp_B, 0.0)[:, None], (0, t)
    )
    # Feed the token at cache slot p + t; its position is the row's prompt length + t.
    mask_Bx1xS = model_lib.attention_mask(p + t + jnp.arange(1), key_valid_BxS)
    logits_Bx1xV, cache = decoder.apply(
      {'params': params}, token_B[:, None], (prompt_len_B + t)[:, None], mask_Bx1xS, s.cache, p + t
    )
    return _DecodeState(
      step=t + 1,
      last_logits_BxV=logits_Bx1xV[:, 0],
      tokens_BxG=tokens_BxG,
      mask_BxG=mask_BxG,
      logprobs_BxG=logprobs_BxG,
      done_B=done_B,
      cache=cache,
      rng=s.rng,
    )

  # Steps before `end` write cache slots below p + end, and attend to those only.
  final = init
  for end in sp.segment_ends():
    final = jax.lax.while_loop(
      lambda s, end=end: (s.step < end) & ~jnp.all(s.done_B),
      lambda s, end=end: body(s, key_valid_BxS[:, : p + end]),
      final,
    )
  return SampleOutput(
    tokens_BxG=final.tokens_BxG,
    mask_BxG=final.mask_BxG,
    logprobs_BxG=final.logprobs_BxG,
    num_steps=final.step,
  )


def decode_params(
  params: PyTree, dtype: str | None, cfg: model_lib.ModelConfig | None = None
) -> PyTree:
  """The weights in the layout the sampler decodes with (`decode_layout`: for unrolled
  layers, each MLP's gate and up kernels stacked), the weight matrices (2 or more dimensions) cast
  to `dtype` (None: as stored); norm scales and biases keep theirs. One copy, made once per
  step; `sample` takes it as it is (given the training layout, it makes the copy itself, once
  per call). With `dtype` equal to the model's activation dtype the samples are unchanged:
  the layers cast their weights to it before every matmul anyway. With `cfg`, LoRA adapters
  in `params` are handled as `decode_layout.for_decoding` says."""
  if cfg is not None:
    return decode_layout.for_decoding(cfg, params, dtype or None)
  return decode_layout.to_decode_layout(params, dtype or None)


# One compiled sampler per (model, sampling settings, shapes), shared by every
# set of parameters: policy, anchor and reference.
sample_jit = xla_options.DefaultBackendJit(sample, static_argnames=('cfg', 'sp', 'num_samples'))


def sequence_logprobs(
  cfg: model_lib.ModelConfig,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
  chunk: int = 0,
) -> jax.Array:
  """Teacher-forced per-token log pi(y_t | x, y_<t) [B, G]; 0 where the mask is False.

  Summing over G gives the sequence log-likelihood over generated tokens only:
  prompt and padding never contribute. `chunk` > 0 (dividing G) projects that many
  positions at a time, recomputing them in the backward pass, so the float32 logits are
  held as [B, chunk, V] rather than [B, G, V]; the values are the same.
  """
  p = prompt_BxP.shape[1]
  tokens_BxL, valid_BxL = model_lib.concat_prompt_response(
    prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG
  )
  positions_BxL, mask_BxLxL = model_lib.sequence_inputs(valid_BxL)
  h_BxLxD, _ = model_lib.Decoder(cfg).apply(
    {'params': params}, tokens_BxL, positions_BxL, mask_BxLxL, method=model_lib.Decoder.hidden
  )
  # Position p - 1 + t predicts response token t; the prompt's own logits are never built.
  logp_BxG = _token_logprobs(cfg, params, h_BxLxD[:, p - 1 : -1], response_BxG, chunk)
  return jnp.where(response_mask_BxG, logp_BxG, 0.0)


def _token_logprobs(
  cfg: model_lib.ModelConfig, params: PyTree, h_BxGxD: jax.Array, tokens_BxG: jax.Array, chunk: int
) -> jax.Array:
  """log softmax(logits)[token] at each position [B, G], from the hidden states that predict
  the tokens; `chunk` positions at a time when 0 < chunk < G (recomputed in the backward)."""
  g = tokens_BxG.shape[1]

  def token_logp(h_BxCxD: jax.Array, tokens_BxC: jax.Array) -> jax.Array:
    logits_BxCxV = model_lib.output_logits(cfg, params, h_BxCxD)
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    return jnp.take_along_axis(logp_BxCxV, tokens_BxC[..., None], axis=-1)[..., 0]

  if chunk <= 0 or chunk >= g:
    return token_logp(h_BxGxD, tokens_BxG)
  if g % chunk:
    raise ValueError(f'the log-prob chunk ({chunk}) must divide the response length ({g}).')
  b, n = h_BxGxD.shape[0], g // chunk
  by_chunk = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  logp_NxBxC = jax.lax.map(
    lambda xs: jax.checkpoint(token_logp)(*xs), (by_chunk(h_BxGxD), by_chunk(tokens_BxG))
  )
  return jnp.moveaxis(logp_NxBxC, 0, 1).reshape(b, g)


def grouped_sequence_logprobs(
  cfg: model_lib.ModelConfig,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxRxG: jax.Array,
  response_mask_BxRxG: jax.Array,
  chunk: int = 0,
) -> jax.Array:
  """`sequence_logprobs` of R responses to each of B prompts [B, R, G], the prompts read once:
  a prefill of the B prompts fills a KV cache, which is repeated for the R responses of each,
  and the B * R responses are read against it (their keys and values written after the
  prompt's). The same values as `sequence_logprobs` on the prompts repeated (to float32
  rounding; gradients flow through the cache into the prompt's pass). A forward and backward
  pass costs (B * P + B * R * G) tokens instead of B * R * (P + G)."""
  b, p = prompt_BxP.shape
  r, g = response_BxRxG.shape[1:]
  prompt_valid_BxP = prompt_valid_BxP.astype(bool)
  decoder = model_lib.Decoder(cfg)
  rows = lambda x: x.reshape(b * r, *x.shape[2:])  # prompt-major: row b * R + j
  response_YxG, response_mask_YxG = rows(response_BxRxG), rows(response_mask_BxRxG).astype(bool)
  # Slots and positions as `sequence_logprobs` reads the concatenated sequence. (Only
  # reshapes and repeats along the batch axis: with rows split over devices, each device
  # keeps its own prompts and their responses, and nothing moves between devices.)
  key_valid_YxL = jnp.concatenate(
    [jnp.repeat(prompt_valid_BxP, r, axis=0), response_mask_YxG], axis=1
  )
  positions_YxL = model_lib.positions_from_mask(key_valid_YxL)

  cache = model_lib.init_cache(cfg, b, p + g)
  # The prompt's queries see only its own slots: the response slots' validity is moot there.
  key_valid_BxL = jnp.concatenate([prompt_valid_BxP, jnp.ones((b, g), bool)], axis=1)
  h_BxPxD, cache = decoder.apply(
    {'params': params},
    prompt_BxP,
    model_lib.positions_from_mask(prompt_valid_BxP),
    model_lib.attention_mask(jnp.arange(p), key_valid_BxL),
    cache,
    0,
    method=model_lib.Decoder.hidden,
  )
  cache = model_lib.repeat_cache(cfg, cache, r)
  h_YxGxD, _ = decoder.apply(
    {'params': params},
    response_YxG,
    positions_YxL[:, p:],
    model_lib.attention_mask(p + jnp.arange(g), key_valid_YxL),
    cache,
    p,
    method=model_lib.Decoder.hidden,
  )
  # The prompt's last position predicts response token 0; response position t, token t + 1.
  last_YxD = jnp.repeat(h_BxPxD[:, -1], r, axis=0)
  h_YxGxD = jnp.concatenate([last_YxD[:, None], h_YxGxD[:, :-1]], axis=1)
  logp_YxG = _token_logprobs(cfg, params, h_YxGxD, response_YxG, chunk)
  return jnp.where(response_mask_YxG, logp_YxG, 0.0).reshape(b, r, g)
