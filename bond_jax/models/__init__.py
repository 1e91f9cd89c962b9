"""Models: the Gemma-family decoder and its LoRA adapters, the sampler, checkpoints in and
out (Hugging Face directories, GGUF files), the reward model, and the sharding rules.

Public: the names below, and the modules `hf` (load_params, load_reward_params, export_hf,
export_peft), `hf_config` (config.json <-> ModelConfig), `sharding` (meshes and rules),
`lora` and `presets`. `gguf_import` (scripts/import_gguf.py) needs requirements-real.txt.
"""

from bond_jax.models import hf, hf_config, lora, presets, sharding
from bond_jax.models.config import ModelConfig
from bond_jax.models.decoder import (
  Decoder,
  base_config,
  forward,
  init_adapters,
  init_params,
)
from bond_jax.models.lora import LoraConfig
from bond_jax.models.presets import PRESETS, preset
from bond_jax.models.sampling import (
  SamplingParams,
  grouped_sequence_logprobs,
  sample,
  sample_jit,
  sequence_logprobs,
)

__all__ = [
  'PRESETS',
  'Decoder',
  'LoraConfig',
  'ModelConfig',
  'SamplingParams',
  'base_config',
  'forward',
  'grouped_sequence_logprobs',
  'hf',
  'hf_config',
  'init_adapters',
  'init_params',
  'lora',
  'preset',
  'presets',
  'sample',
  'sample_jit',
  'sequence_logprobs',
  'sharding',
]
