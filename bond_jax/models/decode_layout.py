"""The layout of the weights the sampler decodes with: a copy built from the training layout
once per sampling call (or once per training step, `sampling.decode_params`); never trained,
never checkpointed, and no value in it differs from the training layout's.

For a model whose layers are unrolled ('layer_i/...'), each MLP's gate and up kernels are
stacked as one, 'mlp/gate_up_proj' [D, 2, F]: one matmul per layer per decoded token instead
of two, on a GPU, where a decode step multiplies a few rows by every weight matrix and the
time goes to reading weights and launching kernels. (XLA:GPU already merges the q, k and v
matmuls, whose weights are small, into one; they stay apart here, which keeps their
tensor-parallel sharding.) Stacking on a new axis keeps F where it was, so a split of F over
'model' and of D over 'fsdp' carries over.

A model that scans over stacked layers ('layers/...', leading axis L) decodes as trained,
scanned (only the cast). Unrolling it for decoding cut the bytes a decode step moves in
XLA:GPU's program (the scan copies each layer's weights and cache slice in and out), but
under FSDP the unrolled decode loop held far more memory, consistent with every layer's
gathered weights kept at once (docs/BENCHMARKS.md, "Why the code is shaped as it is").
Configs that want the faster decode and have the memory can set `model.scan_layers=False`.

The decode layout runs through the same `decoder.Decoder` (with `gate_up=True`) under
`decode_config(cfg)`. LoRA adapters (`lora.py`) are folded into the weights for unrolled
layers, whose stacked gate/up kernel has no place for them, and decoded as they are for
scanned layers (`for_decoding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bond_jax.models import decoder as model_lib
from bond_jax.models import lora, sharding
from bond_jax.types import PyTree


def is_decode_layout(params: PyTree) -> bool:
  """Whether `params` is already in the decode layout (`to_decode_layout`'s output)."""
  layer = params.get('layer_0')
  return layer is not None and 'gate_up_proj' in layer['mlp']


def decode_config(cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
  """The config the sampler decodes under: no rematerialisation (the sampler has no
  backward pass); layers scanned or not as in `cfg`; the architecture and its values are
  unchanged."""
  return dataclasses.replace(cfg, remat='none')


def _cast(x: jax.Array, dtype: Any, stacked: bool = False) -> jax.Array:
  """Weight matrices (2 or more dimensions, a stacked leading layer axis aside) to `dtype`;
  norm scales and biases keep theirs."""
  if dtype is None or x.ndim - stacked < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return x.astype(dtype)


def _layer(layer: PyTree, dtype: Any) -> PyTree:
  """One layer's parameters in the decode layout."""
  out = jax.tree.map(lambda x: _cast(x, dtype), dict(layer))
  mlp = dict(out['mlp'])
  gate_DxF, up_DxF = mlp.pop('gate_proj')['kernel'], mlp.pop('up_proj')['kernel']
  mlp['gate_up_proj'] = {'kernel': jnp.stack([gate_DxF, up_DxF], axis=1)}
  out['mlp'] = mlp
  return out


def for_decoding(cfg: model_lib.ModelConfig, params: PyTree, dtype: str | None = None) -> PyTree:
  """`to_decode_layout` of a model that may carry LoRA adapters: unrolled layers fold them
  into the weights first (a copy of the targeted kernels, `lora.fold`); scanned layers
  decode with them as they are (the decoder applies them; no copy)."""
  if 'layers' not in params:
    params = lora.fold(cfg.lora, params)
  return to_decode_layout(params, dtype)


def to_decode_layout(params: PyTree, dtype: str | None = None) -> PyTree:
  """`params` (training layout, layers unrolled or stacked) in the decode layout, the weight
  matrices cast to `dtype` (None: as stored). Already in the decode layout: only the cast."""
  if is_decode_layout(params):
    return jax.tree.map(lambda x: _cast(x, dtype), params)
  if 'layers' in params:  # stacked layers stay stacked (LoRA adapters too): only the cast
    return jax.tree_util.tree_map_with_path(
      lambda path, x: _cast(x, dtype, stacked=sharding.stacked(sharding.path_name(path))), params
    )
  if lora.has_adapters(params):  # the stacked gate/up kernel has no place for them
    raise ValueError('fold LoRA adapters into the weights (lora.fold) before decoding')
  out = {k: v for k, v in params.items() if not k.startswith('layer_')}
  out = jax.tree.map(lambda x: _cast(x, dtype), out)
  layers = [params[f'layer_{i}'] for i in range(sum(k.startswith('layer_') for k in params))]
  for i, layer in enumerate(layers):
    out[f'layer_{i}'] = _layer(layer, dtype)
  return out
