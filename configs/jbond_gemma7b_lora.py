"""configs/jbond_gemma7b.py with LoRA: the policy and the EMA anchor are rank-16 adapters on
every projection of one frozen bfloat16 Gemma 7B (pi_ref), and Adam trains the adapters only.

  python scripts/train.py --config=configs/jbond_gemma7b_lora.py --workdir=runs/jbond_gemma7b_lora \\
    --config.model.hf_checkpoint=/ckpt/gemma-7b-it --config.reward.checkpoint=/ckpt/reward \\
    --config.data.jsonl_path=/data/prompts.jsonl

Sized by the memory planner for one host: a TPU v5e-8 (eight chips, mesh fsdp=-1) or one
80 GB GPU:
  python scripts/memory_plan.py --config=configs/jbond_gemma7b_lora.py --target=v5e:2x4
docs/BENCHMARKS.md has the planned figures beside the full fine-tune's (which needs four
hosts, a v5e-32). The step size is not the paper's; see configs/jbond_gemma2b_lora.py.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """jbond_gemma7b.py with the fields below changed; every other field (and its comment) is
  there."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_gemma7b.py'))
  c.model.lora.rank = 16  # LoRA adapters' rank
  c.model.lora.alpha = 32.0  # the adapters' output is scaled by alpha / rank = 2
  c.model.lora.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # every projection
  c.optim.learning_rate = 3e-5  # Adam step size of the adapters after warm-up
  c.optim.mu_dtype = ''  # Adam's moments of the adapters are small: kept in float32
  return c
