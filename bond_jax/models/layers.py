"""The decoder's building blocks below attention: RMSNorm, rotary position embeddings, the
Dense layers' product on merged rows, a projection's LoRA adapter, and the gated MLP.

Shape suffixes as in `decoder.py`: B batch, T length, N heads, H head width, D model width,
F MLP width.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bond_jax.models import lora as lora_lib
from bond_jax.models.config import ModelConfig


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


def norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
  """The RMSNorm flavour `cfg` asks for (Gemma's (1 + w) or Llama's w)."""
  return RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.jnp_param_dtype, name=name)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def rows_dot_general(
  lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None, **kw: Any
) -> jax.Array:
  """A Dense layer's product, x [..., K1..Kc] . w [K1..Kc, F...], with x's leading axes merged
  into one row axis first: the same values. XLA:CPU differentiates the batched form by copying
  the activation gradient into a transposed layout before each weight-gradient dot; on rows it
  calls the dot directly (docs/BENCHMARKS.md, "Why the code is shaped as it is"). Other
  contractions are `lax.dot_general`'s."""
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


def with_adapter(
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
    dense = lambda x, feats, name: with_adapter(
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
