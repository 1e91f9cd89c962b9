"""Hugging Face config.json <-> our `ModelConfig`.

Supported model types: gemma, gemma2, gemma3_text (and gemma3, whose text part is read from
its nested text_config), llama, qwen2. A config.json is read through transformers' own
config classes, so legacy fields (`rope_scaling`, `rope_theta`, `rope_local_base_freq`,
`sliding_window_pattern`) are normalised as transformers normalises them.

Each correspondence is written once, as a table or a pair of functions, and read in both
directions: `config_from_hf` (checkpoint -> ours) and `hf_config_dict` (ours -> checkpoint,
which checks that reading its output back gives the same model).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bond_jax.models.config import ModelConfig
from bond_jax.models.lora import LoraConfig

SUPPORTED_MODEL_TYPES = ('gemma', 'gemma2', 'gemma3', 'gemma3_text', 'llama', 'qwen2')
CAUSAL_LM = {
  'gemma': 'GemmaForCausalLM',
  'gemma2': 'Gemma2ForCausalLM',
  'gemma3_text': 'Gemma3ForCausalLM',
  'llama': 'LlamaForCausalLM',
  'qwen2': 'Qwen2ForCausalLM',
}
# HF activation -> ours; the first HF name of each is the one written.
_ACTIVATIONS = {
  'gelu_pytorch_tanh': 'gelu_tanh',
  'gelu_new': 'gelu_tanh',
  'silu': 'silu',
  'swish': 'silu',
}
_HF_ACTIVATION = {ours: hf for hf, ours in reversed(_ACTIVATIONS.items())}
_LAYER_TYPES = {'sliding_attention': 'local', 'full_attention': 'global'}
_HF_LAYER_TYPE = {ours: hf for hf, ours in _LAYER_TYPES.items()}
# (ours, HF) fields every family writes the same way.
_SHARED = (
  ('vocab_size', 'vocab_size'),
  ('num_layers', 'num_hidden_layers'),
  ('embed_dim', 'hidden_size'),
  ('hidden_dim', 'intermediate_size'),
  ('num_heads', 'num_attention_heads'),
  ('num_kv_heads', 'num_key_value_heads'),
  ('norm_eps', 'rms_norm_eps'),
  ('tie_embeddings', 'tie_word_embeddings'),
)
# (ours, HF) fields of Gemma 2 and 3 only.
_SOFT_CAPS = (
  ('attn_logit_softcap', 'attn_logit_softcapping'),
  ('final_logit_softcap', 'final_logit_softcapping'),
)
_GEMMA2_LIKE = ('gemma2', 'gemma3_text')


def _rope_from_hf(params: dict[str, Any], where: str) -> dict[str, Any]:
  """ModelConfig RoPE fields from one transformers `rope_parameters` dict."""
  kind = params.get('rope_type', 'default')
  out: dict[str, Any] = {'rope_base': float(params['rope_theta'])}
  if kind == 'linear':
    out['rope_scale'] = float(params['factor'])
  elif kind == 'llama3':
    out['rope_llama3'] = (
      float(params['factor']),
      float(params['low_freq_factor']),
      float(params['high_freq_factor']),
      int(params['original_max_position_embeddings']),
    )
  elif kind != 'default':
    raise ValueError(
      f"{where}: rope_type {kind!r} is not supported (supported: 'default', 'linear', 'llama3')."
    )
  return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The `rope_parameters` dict of `cfg`'s global layers (the inverse of `_rope_from_hf`)."""
  if cfg.rope_llama3 is not None:
    factor, low, high, original = cfg.rope_llama3
    return {
      'rope_type': 'llama3',
      'rope_theta': cfg.rope_base,
      'factor': factor,
      'low_freq_factor': low,
      'high_freq_factor': high,
      'original_max_position_embeddings': original,
    }
  if cfg.rope_scale != 1.0:
    return {'rope_type': 'linear', 'rope_theta': cfg.rope_base, 'factor': cfg.rope_scale}
  return {'rope_type': 'default', 'rope_theta': cfg.rope_base}


def family(cfg: ModelConfig) -> str:
  """The HF model_type that expresses `cfg`'s switches."""
  if cfg.use_qk_norm:
    return 'gemma3_text'
  if cfg.use_post_norms:
    return 'gemma2'
  if cfg.norm_plus_one:
    return 'gemma'
  return 'qwen2' if cfg.qkv_bias else 'llama'


def config_from_hf(hf_config: dict[str, Any], dtype: str = 'float32') -> ModelConfig:
  """Our ModelConfig for a transformers config.json dict (activations and params in `dtype`)."""
  import transformers  # configs only; no torch needed

  model_type = hf_config.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f'Unsupported architecture: model_type {model_type!r}; supported: '
      f'{", ".join(SUPPORTED_MODEL_TYPES)}.'
    )
  fields = {k: v for k, v in hf_config.items() if k != 'model_type'}
  c = transformers.AutoConfig.for_model(model_type, **fields)
  if model_type == 'gemma3':
    c = c.get_text_config()
    model_type = c.model_type
  where = f'model_type {model_type!r}'
  act = getattr(c, 'hidden_activation', None) or c.hidden_act
  if act not in _ACTIVATIONS:
    raise ValueError(f'{where}: activation {act!r} is not supported ({sorted(_ACTIVATIONS)}).')
  for flag in ('attention_bias', 'mlp_bias', 'use_bidirectional_attention'):
    if getattr(c, flag, False):
      raise ValueError(f'{where}: {flag}=True is not supported.')
  layer_types = tuple(_LAYER_TYPES[t] for t in getattr(c, 'layer_types', None) or ())
  if 'local' not in layer_types:
    layer_types = ()
  kw: dict[str, Any] = {ours: getattr(c, theirs) for ours, theirs in _SHARED}
  kw.update(
    tie_embeddings=bool(kw['tie_embeddings']),
    head_dim=getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads,
    activation=_ACTIVATIONS[act],
    layer_types=layer_types,
    sliding_window=c.sliding_window if layer_types else None,
    dtype=dtype,
    param_dtype=dtype,
  )
  if model_type.startswith('gemma'):
    kw.update(norm_plus_one=True, scale_embeddings=True)
  else:
    kw.update(norm_plus_one=False, scale_embeddings=False, qkv_bias=model_type == 'qwen2')
  if model_type in _GEMMA2_LIKE:
    kw.update({ours: getattr(c, theirs) for ours, theirs in _SOFT_CAPS})
    kw.update(query_pre_attn_scalar=c.query_pre_attn_scalar, use_post_norms=True)
  if model_type == 'gemma3_text':
    rope = c.rope_parameters
    kw.update(use_qk_norm=True, **_rope_from_hf(rope['full_attention'], where))
    local = rope.get('sliding_attention') or {'rope_theta': kw['rope_base']}
    if _rope_from_hf(local, where).keys() != {'rope_base'}:
      raise ValueError(f'{where}: scaled RoPE on sliding layers is not supported.')
    kw['rope_local_base'] = float(local['rope_theta'])
  else:
    kw.update(_rope_from_hf(c.rope_parameters, where))
  return ModelConfig(**kw)


def _canonical(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with fields that do not change the function written one way (how it is
  computed, rematerialised, scanned or adapted is not the checkpoint's business)."""
  local = 'local' in cfg.layer_types
  qpas = cfg.query_pre_attn_scalar
  plain_local_rope = (
    cfg.rope_local_base in (None, cfg.rope_base) and cfg.rope_scale == 1 and not cfg.rope_llama3
  )
  return dataclasses.replace(
    cfg,
    remat='none',
    scan_layers=False,
    lora=LoraConfig(),
    layer_types=cfg.layer_types if local else (),
    sliding_window=cfg.sliding_window if local else None,
    query_pre_attn_scalar=None if qpas in (None, cfg.head_dim) else float(qpas),
    rope_local_base=None if not local or plain_local_rope else float(cfg.rope_local_base),
  )


def hf_config_dict(
  cfg: ModelConfig, architecture: str | None = None, **overrides: Any
) -> dict[str, Any]:
  """The transformers config.json for `cfg` (raises if no supported family expresses it)."""
  import transformers

  model_type = family(cfg)
  rope = _rope_to_hf(cfg)
  fields: dict[str, Any] = {theirs: getattr(cfg, ours) for ours, theirs in _SHARED}
  fields.update(head_dim=cfg.head_dim, rope_parameters=rope, dtype=cfg.param_dtype)
  act = _HF_ACTIVATION[cfg.activation]
  fields['hidden_activation' if model_type in _GEMMA2_LIKE else 'hidden_act'] = act
  layer_types = [_HF_LAYER_TYPE[cfg.layer_type(i)] for i in range(cfg.num_layers)]
  if model_type in _GEMMA2_LIKE:
    fields.update({theirs: getattr(cfg, ours) for ours, theirs in _SOFT_CAPS})
    fields.update(
      query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
      sliding_window=cfg.sliding_window,
      layer_types=layer_types,
    )
  if model_type == 'gemma3_text':
    local = {'rope_type': 'default', 'rope_theta': cfg.rope_local_base or cfg.rope_base}
    fields['rope_parameters'] = {'full_attention': rope, 'sliding_attention': local}
  if model_type == 'qwen2' and cfg.sliding_window:
    fields.update(
      use_sliding_window=True, sliding_window=cfg.sliding_window, layer_types=layer_types
    )
  fields.update(overrides)
  c = transformers.AutoConfig.for_model(model_type, **fields)
  c.architectures = [architecture or CAUSAL_LM[model_type]]
  out = c.to_dict()
  want = _canonical(cfg)
  back = _canonical(
    dataclasses.replace(config_from_hf(out, cfg.dtype), param_dtype=cfg.param_dtype)
  )
  diff = [f.name for f in dataclasses.fields(cfg) if getattr(want, f.name) != getattr(back, f.name)]
  if diff:
    raise ValueError(
      f'ModelConfig cannot be written as HF model_type {model_type!r}: fields '
      f'{diff} would not survive (ours {[getattr(want, n) for n in diff]}, '
      f'HF {[getattr(back, n) for n in diff]}).'
    )
  return out


def read_hf_config(path: str | Path) -> dict[str, Any]:
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'Checkpoint directory {str(path)!r} does not exist.')
  if not (path / 'config.json').is_file():
    raise FileNotFoundError(f'No config.json in checkpoint directory {str(path)!r}.')
  return json.loads((path / 'config.json').read_text())
