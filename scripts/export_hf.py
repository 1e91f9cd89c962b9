"""Write a run's trained policy as a Hugging Face checkpoint directory (config.json,
safetensors, tokenizer files for real-model runs), loadable by transformers. Usage:

  python scripts/export_hf.py --workdir=runs/jbond_tiny --out=runs/jbond_tiny/hf_policy

A LoRA run's adapters are folded into the weights; --adapters_only writes them alone as a
PEFT adapter directory instead (`peft.PeftModel.from_pretrained(base, out)`).

A run trained across hosts is exported across them: start the same command on every host
with scripts/train.py's process flags (--coordinator_address, --num_processes,
--process_id, or --distributed); each tensor is gathered to process 0, which writes.
"""

import sys

from absl import app, flags, logging

from bond_jax.run import loop as trainer
from bond_jax.run import processes

_WORKDIR = flags.DEFINE_string('workdir', None, 'A workdir written by scripts/train.py.')
_OUT = flags.DEFINE_string('out', None, 'Directory to write the Hugging Face checkpoint to.')
_ADAPTERS_ONLY = flags.DEFINE_bool(
  'adapters_only', False, "A LoRA run's adapters alone, as a PEFT adapter directory."
)
_PROCESSES = processes.define_flags()
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    processes.join(_PROCESSES)
    out = trainer.export_policy(_WORKDIR.value, _OUT.value, adapters_only=_ADAPTERS_ONLY.value)
  except (FileNotFoundError, trainer.ConfigError, trainer.RunError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
