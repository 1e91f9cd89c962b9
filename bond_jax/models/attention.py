"""Attention: multi-query / grouped-query attention with RoPE, local (sliding-window) and
global layers, soft-capping (Gemma 2), QK-norm (Gemma 3), optional q/k/v biases (Qwen2)
and LoRA adapters on its projections, reading and writing an explicit KV cache (the cache
and mask conventions are in `decoder.py`'s docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from bond_jax.models import layers
from bond_jax.models.config import ModelConfig
from bond_jax.models.layers import (
  norm,
  rope_inv_freq,
  rotate,
  softcap,
  with_adapter,
)


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
        dot_general=layers.rows_dot_general,  # looked up per call (tests count its calls)
        name=name,
      )
      in_shape = x.shape[-len(axis) :] if isinstance(axis, tuple) else x.shape[-1:]
      return with_adapter(cfg, name, layer(x), x, in_shape)

    q_BxTxNxH = project(x_BxTxD, (cfg.num_heads, cfg.head_dim), 'q_proj', bias=cfg.qkv_bias)
    k_BxTxKxH = project(x_BxTxD, (cfg.num_kv_heads, cfg.head_dim), 'k_proj', bias=cfg.qkv_bias)
    v_BxTxKxH = project(x_BxTxD, (cfg.num_kv_heads, cfg.head_dim), 'v_proj', bias=cfg.qkv_bias)
    if cfg.use_qk_norm:
      q_BxTxNxH = norm(cfg, 'q_norm')(q_BxTxNxH)
      k_BxTxKxH = norm(cfg, 'k_norm')(k_BxTxKxH)
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
    # cache array twice a step (docs/BENCHMARKS.md, "Why the code is shaped as it is").
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
      logits_BxKxGxS1 = softcap(logits_BxKxGxS1, cfg.attn_logit_softcap)
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
      logits_BxKxGxS = softcap(logits_BxKxGxS, cfg.attn_logit_softcap)
      logits_BxKxGxS = jnp.where(mask_BxTxS[:, None, None, 0], logits_BxKxGxS, big_neg)
      probs_BxKxGxS = jax.nn.softmax(logits_BxKxGxS, axis=-1).astype(v_BxSxKxH.dtype)
      out_BxKxGxH = jnp.einsum('bkgs,bskh->bkgh', probs_BxKxGxS, v_BxSxKxH)
      out_BxTxNxH = out_BxKxGxH.reshape(b, 1, n, h)
    else:
      logits_BxKxGxTxS = jnp.einsum(
        'btkgh,bskh->bkgts', q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
      )
      logits_BxKxGxTxS = softcap(logits_BxKxGxTxS, cfg.attn_logit_softcap)
      logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, big_neg)
      probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
      out_BxTxKxGxH = jnp.einsum('bkgts,bskh->btkgh', probs, v_BxSxKxH)
      out_BxTxNxH = out_BxTxKxGxH.reshape(b, t, n, h)
    out_BxTxD = project(out_BxTxNxH, cfg.embed_dim, 'o_proj', axis=(-2, -1))
    return checkpoint_name(out_BxTxD, 'attn_out'), new_cache
