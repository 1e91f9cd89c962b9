"""configs/jbond_gemma2b.py with LoRA: the policy and the EMA anchor are rank-16 adapters on
every projection of one frozen bfloat16 Gemma 2B (pi_ref), and Adam trains the adapters only.

  python scripts/train.py --config=configs/jbond_gemma2b_lora.py --workdir=runs/jbond_gemma2b_lora \\
    --config.model.hf_checkpoint=/ckpt/gemma-1.1-2b-it --config.reward.checkpoint=/ckpt/reward \\
    --config.data.jsonl_path=/data/prompts.jsonl

Sized by the memory planner for the smallest hardware it fits, a TPU v5e-4 (four chips, mesh
fsdp=-1) or one 40 GB GPU:
  python scripts/memory_plan.py --config=configs/jbond_gemma2b_lora.py --target=v5e:2x2
docs/BENCHMARKS.md has the planned figures beside the full fine-tune's. The step size is
not the paper's (which trains the whole model at 3e-6): LoRA adapters, whose product starts
at zero, are usually trained with about ten times the full model's step; untuned here.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """jbond_gemma2b.py with the fields below changed; every other field (and its comment) is
  there."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_gemma2b.py'))
  c.model.lora.rank = 16  # LoRA adapters' rank
  c.model.lora.alpha = 32.0  # the adapters' output is scaled by alpha / rank = 2
  c.model.lora.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # every projection
  c.optim.learning_rate = 3e-5  # Adam step size of the adapters after warm-up
  c.optim.mu_dtype = ''  # Adam's moments of the adapters are small: kept in float32
  return c
