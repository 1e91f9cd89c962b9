"""The layout of the weights the sampler decodes with: a copy built from the training layout
once per sampling call (or once per training step, `sampling.decode_params`); never trained,
never checkpointed, and no value in it differs from the training layout's.

Two changes, both for a decode step on a GPU, where each layer multiplies a few rows by
every weight matrix and the time goes to reading weights and to launching kernels:

- Layers unrolled ('layer_i/...'), also for a model that scans over stacked layers
  ('layers/...', leading axis L). A decode step that scans copies each layer's weights and
  its slice of the stacked KV cache out of the stacked arrays and writes the cache back:
  about three times the bytes of the unrolled step in XLA:GPU's optimized program for
  gemma_2b at batch 64 (21.9 GB against 7.0 GB read and written per token, compiled for
  an H100 without one).
- Each MLP's gate and up kernels stacked as one, 'mlp/gate_up_proj' [D, 2, F]: one matmul
  per layer per token instead of two. (XLA:GPU already merges the q, k and v matmuls, whose
  weights are small, into one; they stay apart here, which keeps their tensor-parallel
  sharding.) Stacking on a new axis keeps F where it was, so a split of F over 'model' and
  of D over 'fsdp' carries over.

The decode layout runs through the same `decoder.Decoder` (with `gate_up=True`) under
`decode_config(cfg)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bond_jax.models import decoder as model_lib
from bond_jax.types import PyTree


def is_decode_layout(params: PyTree) -> bool:
  """Whether `params` is already in the decode layout (`to_decode_layout`'s output)."""
  layer = params.get('layer_0')
  return layer is not None and 'gate_up_proj' in layer['mlp']


def decode_config(cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
  """The config the decode layout runs under: layers unrolled, no rematerialisation (the
  sampler has no backward pass); the architecture and its values are unchanged."""
  return dataclasses.replace(cfg, scan_layers=False, remat='none')


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
  """Weight matrices (2 or more dimensions) to `dtype`; norm scales and biases keep theirs."""
  if dtype is None or x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
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


def to_decode_layout(params: PyTree, dtype: str | None = None) -> PyTree:
  """`params` (training layout, layers unrolled or stacked) in the decode layout, the weight
  matrices cast to `dtype` (None: as stored). Already in the decode layout: only the cast."""
  if is_decode_layout(params):
    return jax.tree.map(lambda x: _cast(x, dtype), params)
  out = {k: v for k, v in params.items() if k != 'layers' and not k.startswith('layer_')}
  out = jax.tree.map(lambda x: _cast(x, dtype), out)
  if 'layers' in params:
    stacked = params['layers']
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    layers = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)]
  else:
    layers = [params[f'layer_{i}'] for i in range(sum(k.startswith('layer_') for k in params))]
  for i, layer in enumerate(layers):
    out[f'layer_{i}'] = _layer(layer, dtype)
  return out
