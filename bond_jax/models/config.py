"""The decoder's configuration: `ModelConfig`, the architecture and how it is computed.

One dataclass covers the families the decoder implements (Gemma 1, 2 and 3 text, Llama,
Qwen2; `decoder.py` says what each switch does) plus choices that change memory and
compute but never values (dtypes, rematerialisation, scanned layers) and LoRA adapters
(`lora.py`). Frozen and hashable: it is a static argument of every jitted function. Known
checkpoints' shapes are in `presets.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bond_jax.models import lora as lora_lib

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
  """Architecture of the decoder (presets of known checkpoints: `presets.py`)."""

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
