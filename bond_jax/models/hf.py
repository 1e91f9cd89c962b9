"""Hugging Face checkpoints: config mapping, tensor-by-tensor loading, export.

Supported model types: gemma, gemma2, gemma3_text (and gemma3, whose text part is
read from its nested text_config), llama, qwen2. The config.json is read through
transformers' own config classes, so legacy fields (`rope_scaling`, `rope_theta`,
`rope_local_base_freq`, `sliding_window_pattern`) are normalised the same way
transformers normalises them.

Loading walks our parameter tree (an abstract `jax.eval_shape` of init, so nothing
is allocated up front), reads each tensor alone from its safetensors file,
converts it to our layout and puts it straight onto its sharding: the host never
holds more than one tensor.

Layouts (HF nn.Linear weights are [out, in]): q/k/v [N*H, D] -> [D, N, H];
o_proj [D, N*H] -> [N, H, D]; MLP and heads [out, in] -> [in, out]; q/k/v biases
[N*H] -> [N, H]; embeddings and norm scales as they are. Gemma 1 / Llama / Qwen2
name their pre-MLP norm `post_attention_layernorm`; Gemma 2/3 use that name for
the norm after attention and `pre_feedforward_layernorm` for the pre-MLP one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from bond_jax.models import decoder as model_lib
from bond_jax.models import lora, reward_model
from bond_jax.models import sharding as sharding_lib
from bond_jax.models.decoder import ModelConfig
from bond_jax.models.hf_config import (
  CAUSAL_LM,
  config_from_hf,
  family,
  hf_config_dict,
  read_hf_config,
)
from bond_jax.types import PyTree

_TOKENIZER_FILES = (
  'tokenizer.json',
  'tokenizer_config.json',
  'tokenizer.model',
  'special_tokens_map.json',
  'added_tokens.json',
  'vocab.json',
  'merges.txt',
  'chat_template.jinja',
  'generation_config.json',
)


# ---------------------------------------------------------------------------
# Tensor names and layouts.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  hf_name: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _layout(kind: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], Callable, Callable]:
  """(HF shape, HF->ours, ours->HF) for a leaf of our shape. kind: 'same', 'flat' or
  'T<k>' (our first k dims are the HF input dims: transpose + reshape)."""
  if kind == 'same':
    return shape, lambda w: w, lambda x: x
  if kind == 'flat':
    return (math.prod(shape),), lambda w: w.reshape(shape), lambda x: x.reshape(-1)
  k = int(kind[1:])
  n_in, n_out = math.prod(shape[:k]), math.prod(shape[k:])
  return (
    (n_out, n_in),
    lambda w: np.ascontiguousarray(w.T).reshape(shape),
    lambda x: np.ascontiguousarray(x.reshape(n_in, n_out).T),
  )


_LAYER_RULES = (  # (our path inside layer_i, HF name inside layers.i, kind)
  (r'pre_attn_norm/scale', 'input_layernorm.weight', 'same'),
  (r'attn/([qkv])_proj/kernel', r'self_attn.\1_proj.weight', 'T1'),
  (r'attn/([qkv])_proj/bias', r'self_attn.\1_proj.bias', 'flat'),
  (r'attn/o_proj/kernel', 'self_attn.o_proj.weight', 'T2'),
  (r'attn/([qk])_norm/scale', r'self_attn.\1_norm.weight', 'same'),
  (r'mlp/(gate|up|down)_proj/kernel', r'mlp.\1_proj.weight', 'T1'),
)


def _hf_tensor(
  name: str, shape: tuple[int, ...], cfg: ModelConfig, prefix: str, head_prefix: str
) -> _Tensor:
  """The HF tensor behind our parameter `name` ('layer_0/attn/q_proj/kernel')."""
  post = cfg.use_post_norms
  norms = {
    'post_attn_norm': 'post_attention_layernorm',
    'post_ffw_norm': 'post_feedforward_layernorm',
    'pre_ffw_norm': 'pre_feedforward_layernorm' if post else 'post_attention_layernorm',
  }
  rules = _LAYER_RULES + tuple((rf'{k}/scale', f'{v}.weight', 'same') for k, v in norms.items())
  hf, kind = None, None
  if name == 'embedder/embedding':
    hf, kind = f'{prefix}embed_tokens.weight', 'same'
  elif name == 'final_norm/scale':
    hf, kind = f'{prefix}norm.weight', 'same'
  elif name == 'lm_head/kernel':
    hf, kind = f'{head_prefix}lm_head.weight', 'T1'
  elif name == 'score/kernel':
    hf, kind = f'{head_prefix}score.weight', 'T1'
  elif m := re.fullmatch(r'layer_(\d+)/(.+)', name):
    for pattern, hf_pattern, k in rules:
      if sub := re.fullmatch(pattern, m.group(2)):
        hf, kind = f'{prefix}layers.{m.group(1)}.{sub.expand(hf_pattern)}', k
        break
  if hf is None:
    raise ValueError(f'No Hugging Face tensor is known for our parameter {name!r}.')
  return _Tensor(hf, *_layout(kind, shape))


def _per_layer(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
  """[(name, shape)] of the per-layer parameters behind one of ours: a scanned layer's
  stack 'layers/attn/q_proj/kernel' [L, ...] is 'layer_i/attn/q_proj/kernel' [...] for
  each i; any other parameter is itself."""
  if not sharding_lib.stacked(name):
    return [(name, shape)]
  rest = name.split('layers/', 1)[1]
  return [(f'layer_{i}/{rest}', shape[1:]) for i in range(shape[0])]


# ---------------------------------------------------------------------------
# Loading.


def _weight_map(path: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file holding it (single file or sharded index)."""
  index = path / 'model.safetensors.index.json'
  if index.is_file():
    weight_map = json.loads(index.read_text())['weight_map']
    return {name: path / file for name, file in weight_map.items()}
  files = [path / 'model.safetensors'] if (path / 'model.safetensors').is_file() else []
  if not files:
    raise FileNotFoundError(
      f'No safetensors weights in {str(path)!r} (expected '
      'model.safetensors or model.safetensors.index.json).'
    )
  out = {}
  for file in files:
    with safe_open(file, framework='numpy') as f:
      out.update(dict.fromkeys(f.keys(), file))
  return out


def _load_tree(
  path: str | Path, cfg: ModelConfig, abstract: PyTree, strip: str, shardings: PyTree
) -> Any:
  path = Path(path)
  weight_map = _weight_map(path)
  prefixes = ('model.', 'model.language_model.', 'language_model.model.', '')
  prefix = next((p for p in prefixes if f'{p}embed_tokens.weight' in weight_map), 'model.')
  head_prefix = 'language_model.' if prefix == 'language_model.model.' else ''
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  names = [sharding_lib.path_name(p).removeprefix(strip) for p, _ in leaves]
  tensors = [  # per leaf, its HF tensors (one per layer for a scanned layer's stack)
    [_hf_tensor(n, s, cfg, prefix, head_prefix) for n, s in _per_layer(name, tuple(x.shape))]
    for name, (_, x) in zip(names, leaves, strict=True)
  ]
  missing = [t.hf_name for ts in tensors for t in ts if t.hf_name not in weight_map]
  if missing:
    raise KeyError(
      f'Checkpoint {str(path)!r} is missing tensor(s) {missing[:5]}'
      f'{" and more" if len(missing) > 5 else ""}.'
    )
  if shardings is None:
    shard_leaves = [None] * len(leaves)
  else:
    if isinstance(shardings, jax.sharding.Mesh):
      shardings = sharding_lib.param_shardings(abstract, shardings)
    shard_leaves = treedef.flatten_up_to(shardings)
  out: list[Any] = [None] * len(leaves)
  with contextlib.ExitStack() as files:
    opened = {
      file: files.enter_context(safe_open(file, framework='numpy'))
      for file in sorted({weight_map[t.hf_name] for ts in tensors for t in ts})
    }
    for i, ts in enumerate(tensors):  # one leaf on the host at a time
      spec = leaves[i][1]
      parts = []
      for t in ts:
        f = opened[weight_map[t.hf_name]]
        found = tuple(f.get_slice(t.hf_name).get_shape())
        if found != t.hf_shape:
          raise ValueError(
            f'Tensor {t.hf_name!r} in {weight_map[t.hf_name].name} has shape {found}, '
            f'expected {t.hf_shape} (our {names[i]} {tuple(spec.shape)}).'
          )
        parts.append(t.to_ours(f.get_tensor(t.hf_name)).astype(spec.dtype))
      w = np.stack(parts) if sharding_lib.stacked(names[i]) else parts[0]
      del parts
      out[i] = jax.device_put(w, shard_leaves[i])
      del w
  return jax.tree_util.tree_unflatten(treedef, out)


def _resolve_cfg(path: str | Path, cfg: ModelConfig | None, dtype: str | None) -> ModelConfig:
  hf_config = read_hf_config(path)
  if cfg is None:
    return config_from_hf(hf_config, dtype or 'float32')
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype) if dtype else cfg


def load_params(
  path: str | Path,
  cfg: ModelConfig | None = None,
  dtype: str | None = None,
  shardings: PyTree = None,
) -> tuple[ModelConfig, PyTree]:
  """(cfg, params) of a *ForCausalLM checkpoint directory.

  cfg: None reads it from config.json; dtype: activation and parameter dtype (None:
  cfg's own, or float32); shardings: None (default device), a Mesh (use
  `sharding.param_shardings`) or a pytree of shardings like the params.
  """
  cfg = _resolve_cfg(path, cfg, dtype)
  # A checkpoint holds a base model: LoRA adapters, if cfg has them, are not in it.
  base = model_lib.base_config(cfg)
  abstract = jax.eval_shape(lambda: model_lib.init_params(base, jax.random.key(0)))
  return cfg, _load_tree(path, base, abstract, '', shardings)


def load_reward_params(
  path: str | Path,
  cfg: ModelConfig | None = None,
  dtype: str | None = None,
  shardings: PyTree = None,
) -> tuple[ModelConfig, PyTree]:
  """(cfg, {'decoder': ..., 'score': {'kernel': [D, 1]}}) of a *ForSequenceClassification
  checkpoint with one label (its `score.weight` is [1, D])."""
  cfg = _resolve_cfg(path, cfg, dtype)
  abstract = jax.eval_shape(lambda: reward_model.init_params(cfg, jax.random.key(0)))
  return cfg, _load_tree(path, cfg, abstract, 'decoder/', shardings)


# ---------------------------------------------------------------------------
# Export.


def export_peft(
  cfg: ModelConfig,
  adapters: PyTree,
  out_dir: str | Path,
  base_model: str | Path = '',
) -> Path:
  """LoRA adapters as a PEFT adapter directory (adapter_config.json and
  adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, out_dir)` applies
  to the base checkpoint `base_model`: each adapter of ours, a [*in, r] and b [r, *out],
  is lora_A.weight [r, in] and lora_B.weight [out, r] of the HF projection it sits on, with
  PEFT's scaling lora_alpha / r equal to ours. Gathered and written like `export_hf`."""
  out_dir = Path(out_dir)
  writer = jax.process_index() == 0
  arrays = {}
  for p, x in jax.tree_util.tree_leaves_with_path(adapters):
    name = sharding_lib.path_name(p)  # '.../q_proj_lora/a'
    projection, factor = name.rsplit('/', 1)
    kernel = projection.removesuffix(lora.SUFFIX) + '/kernel'
    parts = _per_layer(kernel, tuple(x.shape))
    for i, (part, _) in enumerate(parts):
      module = _hf_tensor(part, (), cfg, 'model.', '').hf_name.removesuffix('.weight')
      value = _to_host(x[i] if len(parts) > 1 else x).astype(np.float32)
      r = cfg.lora.rank
      if factor == 'a':  # [*in, r] -> [r, in]
        key, value = 'lora_A', value.reshape(-1, r).T
      else:  # [r, *out] -> [out, r]
        key, value = 'lora_B', value.reshape(r, -1).T
      arrays[f'base_model.model.{module}.{key}.weight'] = np.ascontiguousarray(value)
  if not writer:
    return out_dir
  out_dir.mkdir(parents=True, exist_ok=True)
  save_file(arrays, str(out_dir / 'adapter_model.safetensors'), metadata={'format': 'pt'})
  config = {
    'peft_type': 'LORA',
    'task_type': 'CAUSAL_LM',
    'base_model_name_or_path': str(base_model),
    'r': cfg.lora.rank,
    'lora_alpha': cfg.lora.alpha,
    'lora_dropout': 0.0,
    'bias': 'none',
    'fan_in_fan_out': False,
    'target_modules': sorted(lora.TARGETS[t][1] for t in cfg.lora.targets),
    'inference_mode': True,
    'init_lora_weights': True,
    'use_rslora': False,
    'use_dora': False,
    'modules_to_save': None,
  }
  (out_dir / 'adapter_config.json').write_text(json.dumps(config, indent=2, sort_keys=True))
  return out_dir


def _to_host(x: Any) -> np.ndarray:
  """One tensor, whole, on this host: its shards gathered from every process when some
  live on other hosts (a collective: every process calls it, in the same order)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_hf(
  cfg: ModelConfig,
  params: PyTree,
  out_dir: str | Path,
  tokenizer_dir: str | Path | None = None,
  max_shard_bytes: int = 5 * 2**30,
  **hf_overrides: Any,
) -> Path:
  """Write config.json + safetensors that `AutoModelForCausalLM.from_pretrained` loads.

  Reward-model params ({'decoder', 'score'}) are written as *ForSequenceClassification
  with num_labels=1. Weights go one shard at a time (model.safetensors, or
  model-0000i-of-0000n.safetensors + index past max_shard_bytes), so the host holds at
  most one shard; `params` may be sharded arrays (on several processes too), each
  gathered to the host one tensor at a time. On several processes every one must call
  this (the gathers are collectives) and process 0 writes.
  """
  out_dir = Path(out_dir)
  writer = jax.process_index() == 0
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)
  reward = 'score' in params
  arch = None
  if reward:
    arch = CAUSAL_LM[family(cfg)].replace('ForCausalLM', 'ForSequenceClassification')
    hf_overrides = {'num_labels': 1, **hf_overrides}
  hf_config = hf_config_dict(cfg, arch, **hf_overrides)
  if writer:
    (out_dir / 'config.json').write_text(json.dumps(hf_config, indent=2, sort_keys=True))

  # One entry per HF tensor: (its layout, how to take it from our tree); a scanned
  # layer's stack gives one per layer, sliced on the devices before its gather.
  entries: list[tuple[_Tensor, Callable[[], np.ndarray], int]] = []
  for p, x in jax.tree_util.tree_leaves_with_path(params):
    name = sharding_lib.path_name(p).removeprefix('decoder/')
    parts = _per_layer(name, tuple(x.shape))
    for i, (part, shape) in enumerate(parts):
      take = (lambda x=x, i=i: _to_host(x[i])) if len(parts) > 1 else (lambda x=x: _to_host(x))
      nbytes = math.prod(shape) * x.dtype.itemsize
      entries.append((_hf_tensor(part, shape, cfg, 'model.', ''), take, nbytes))
  shards: list[list[int]] = [[]]
  size = 0
  for i, (_, _, nbytes) in enumerate(entries):
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(i)
    size += nbytes
  n = len(shards)
  weight_map = {}
  for s, indices in enumerate(shards):
    file = 'model.safetensors' if n == 1 else f'model-{s + 1:05d}-of-{n:05d}.safetensors'
    arrays = {entries[i][0].hf_name: entries[i][0].to_hf(entries[i][1]()) for i in indices}
    if writer:
      save_file(arrays, str(out_dir / file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(arrays, file))
    del arrays
  if not writer:
    return out_dir
  if n > 1:
    total = sum(nbytes for _, _, nbytes in entries)
    index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
    (out_dir / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))
  if tokenizer_dir is not None:
    found = [f for f in _TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
    if not found:
      raise FileNotFoundError(f'No tokenizer files {_TOKENIZER_FILES} in {str(tokenizer_dir)!r}.')
    for f in found:
      shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
  return out_dir
