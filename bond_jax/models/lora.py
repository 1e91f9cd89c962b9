"""LoRA adapters (Hu et al. 2021) on the decoder's projections, and the trees that hold them.

A targeted projection y = x . W gains y += (x . a) . b * alpha / rank, with a [*in, rank]
and b [rank, *out] (W is [*in, *out]); b starts at 0, so a model with fresh adapters is its
base exactly. The adapters live beside their projection in the parameter tree, under the
projection's name plus '_lora' ('layer_3/attn/q_proj_lora/{a, b}'; with scanned layers
stacked on a leading axis like every layer parameter, 'layers/attn/q_proj_lora/...').

The decoder applies an adapter only where the tree holds one (`Adapter`), so one module runs
three models of a J-BOND run over one frozen base: pi_ref is the base alone, the policy is
the base with the policy's adapters (`attach`), the anchor the base with the anchor's.
Log-likelihoods and gradients read the adapters unfolded, so a gradient reaches the adapters
only and no weight gradient of the base is ever formed. The sampler decodes scanned layers
with the adapters as they are, and unrolled layers, whose decode layout stacks the gate and
up kernels, with the adapters folded into the weights (`fold`: a copy made per sampling
call, as the decode layout is; `decode_layout.for_decoding`).

Targets name projections: 'q', 'k', 'v', 'o' (attention) and 'gate', 'up', 'down' (MLP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bond_jax.types import PyTree

# Target -> (the block's submodule, the projection's name in it).
TARGETS: dict[str, tuple[str, str]] = {
  'q': ('attn', 'q_proj'),
  'k': ('attn', 'k_proj'),
  'v': ('attn', 'v_proj'),
  'o': ('attn', 'o_proj'),
  'gate': ('mlp', 'gate_proj'),
  'up': ('mlp', 'up_proj'),
  'down': ('mlp', 'down_proj'),
}
SUFFIX = '_lora'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, of what rank, at what scale (rank 0: none)."""

  rank: int = 0
  alpha: float = 0.0  # the adapter's output is scaled by alpha / rank
  targets: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
      raise ValueError(f'model.lora.rank={self.rank!r} is invalid: an integer >= 0 (0: off).')
    if self.rank == 0:
      return
    number = isinstance(self.alpha, int | float) and not isinstance(self.alpha, bool)
    if not (number and self.alpha > 0):
      raise ValueError(f'model.lora.alpha={self.alpha!r} is invalid: a number > 0.')
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(
        f'model.lora.targets={tuple(self.targets)!r} is invalid: one or more distinct names '
        f'of {tuple(TARGETS)}.'
      )

  @property
  def on(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_projection(self, name: str) -> bool:
    """Whether the projection called `name` ('q_proj', 'down_proj', ...) gets an adapter."""
    return self.on and any(TARGETS[t][1] == name for t in self.targets)


def init_a(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """a [*in, rank]: uniform in +-1/sqrt(fan_in), PEFT's default (Kaiming-uniform, a=sqrt(5))."""
  fan_in = math.prod(shape[:-1])
  return jax.random.uniform(key, shape, dtype, -(fan_in**-0.5), fan_in**-0.5)


class Adapter(nn.Module):
  """The low-rank path of one projection: x [..., *in] -> (x . a) . b * scale [..., *out],
  or None when the parameter tree holds no adapter here (the base model)."""

  lora: LoraConfig
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array | None:
    if not (self.is_initializing() or self.has_variable('params', 'a')):
      return None
    r = self.lora.rank
    a = self.param('a', init_a, (*self.in_shape, r), self.param_dtype)
    b = self.param('b', nn.initializers.zeros, (r, *self.out_shape), self.param_dtype)
    k, f = math.prod(self.in_shape), math.prod(self.out_shape)
    lead = x.shape[: x.ndim - len(self.in_shape)]
    h_RxK = x.reshape(-1, k).astype(self.dtype)
    h_Rxr = h_RxK @ a.reshape(k, r).astype(self.dtype)
    out_RxF = (h_Rxr @ b.reshape(r, f).astype(self.dtype)) * jnp.asarray(
      self.lora.scale, self.dtype
    )
    return out_RxF.reshape(*lead, *self.out_shape)


def is_adapter(key: str) -> bool:
  return key.endswith(SUFFIX)


def has_adapters(params: PyTree) -> bool:
  """Whether any subtree of `params` is an adapter."""
  if not isinstance(params, dict):
    return False
  return any(is_adapter(k) or has_adapters(v) for k, v in params.items())


def split(params: PyTree) -> tuple[PyTree, PyTree]:
  """(base, adapters): the same tree without its adapters, and its adapters alone (nested
  as in `params`, holding only the adapter subtrees)."""
  base, adapters = {}, {}
  for k, v in params.items():
    if is_adapter(k):
      adapters[k] = v
    elif isinstance(v, dict) and has_adapters(v):
      base[k], adapters[k] = split(v)
    else:
      base[k] = v
  return base, adapters


def attach(base: PyTree, adapters: PyTree) -> PyTree:
  """The base with the adapters beside their projections (the inverse of `split`); the
  result shares every array with its inputs (no copy)."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = v if is_adapter(k) else attach(base[k], v)
  return out


def _delta(a: jax.Array, b: jax.Array, stacked: bool) -> jax.Array:
  """a . b over the rank axis: [*in, r] x [r, *out] -> [*in, *out] (per layer if stacked)."""
  product = lambda a, b: jnp.tensordot(a, b, axes=1)
  return jax.vmap(product)(a, b) if stacked else product(a, b)


def fold(lora: LoraConfig, params: PyTree, stacked: bool | None = None) -> PyTree:
  """`params` with each adapter folded into its projection's kernel, W + a . b * scale (in
  the kernel's dtype), and the adapters dropped: one model, the same function (to float
  rounding). No adapters: `params` itself."""
  if not has_adapters(params):
    return params
  if stacked is None:
    stacked = 'layers' in params
  out = {}
  for k, v in params.items():
    if is_adapter(k):
      continue
    adapter = params.get(k + SUFFIX)
    if adapter is not None:
      kernel = v['kernel']
      delta = _delta(adapter['a'].astype(jnp.float32), adapter['b'].astype(jnp.float32), stacked)
      v = {**v, 'kernel': (kernel.astype(jnp.float32) + delta * lora.scale).astype(kernel.dtype)}
    elif isinstance(v, dict):
      v = fold(lora, v, stacked)
    out[k] = v
  return out
