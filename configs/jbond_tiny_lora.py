"""configs/jbond_tiny.py with LoRA: the policy and the EMA anchor are low-rank adapters on
every projection of one frozen pi_ref (the supervised base), and Adam trains the adapters
only.

Command (from the repository root):

  python scripts/train.py --config=configs/jbond_tiny_lora.py --workdir=runs/jbond_tiny_lora

Rank 32 with alpha 32 (scale 1): the tiny model's widths are 64 (attention, D) and 256 (MLP),
so rank 32 is half of D. Adapters learn with a larger step than whole weights (their
product starts at zero), hence 1e-3 against 2e-4. docs/REPRODUCTION.md has its table beside
the full fine-tune's.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """jbond_tiny.py with the fields below changed; every other field (and its comment) is
  there."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_tiny.py'))
  c.model.lora.rank = 32  # LoRA adapters' rank
  c.model.lora.alpha = 32.0  # the adapters' output is scaled by alpha / rank = 1
  c.model.lora.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # every projection
  c.optim.learning_rate = 1e-3  # Adam step size after warm-up
  return c
