"""Tiny Hugging Face artefacts built in code, for tests: nothing is downloaded.

- `make_tokenizer_dir`: a byte-level BPE tokenizer trained on a few sentences,
  with Gemma's special-token layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3,
  <start_of_turn>, <end_of_turn>), BOS added by the tokenizer and a Gemma-style
  chat template. Byte-level, so any text (TFDS mock strings included) encodes and
  decodes exactly.
- `make_policy_dir` / `make_reward_dir`: random tiny GemmaForCausalLM /
  GemmaForSequenceClassification (num_labels=1) checkpoints in safetensors, with
  the tokenizer files copied in, loadable by `hf.load_params` /
  `hf.load_reward_params` and by `AutoTokenizer`.
- `mock_tfds`: `tfds.testing.mock_data` for builders read through
  `tfds.data_source` (array_record; no TensorFlow needed).
- `write_jsonl`: a local JSONL prompt file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIALS = ('<pad>', '<eos>', '<bos>', '<unk>', '<start_of_turn>', '<end_of_turn>')
GEMMA_CHAT_TEMPLATE = (
  '{{ bos_token }}{% for message in messages %}'
  "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
  "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
  '{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}'
)
CORPUS = (
  'Summarize the following article in one sentence.',
  'The cat sat on the mat and the dog sat on the log.',
  'Scientists found that the river was warmer than last year.',
  'The city council voted to build a new bridge over the river.',
  'Please write a short poem about the sea and the sky.',
  'What is the capital of France? Paris is the capital of France.',
  'Summary: a new bridge will be built. The answer is yes.',
)


def make_tokenizer_dir(
  path: str | Path,
  vocab_size: int = 384,
  corpus: Iterable[str] = CORPUS,
  chat_template: bool = True,
  pad_token: bool = True,
) -> Path:
  """Train a byte-level BPE on `corpus`, wrap it as PreTrainedTokenizerFast, save it."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  path = Path(path)
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIALS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(list(corpus), trainer=trainer)
  bos_id = tok.token_to_id('<bos>')
  tok.post_processor = processors.TemplateProcessing(
    single='<bos> $A', pair='<bos> $A $B', special_tokens=[('<bos>', bos_id)]
  )
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token='<bos>',
    eos_token='<eos>',
    unk_token='<unk>',
    pad_token='<pad>' if pad_token else None,
    additional_special_tokens=['<start_of_turn>', '<end_of_turn>'],
  )
  if chat_template:
    hf.chat_template = GEMMA_CHAT_TEMPLATE
  hf.save_pretrained(str(path))
  return path


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
  import transformers

  return len(transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))


def _gemma_config(vocab_size: int, **overrides):
  import transformers

  fields = dict(
    vocab_size=vocab_size,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
  )
  fields.update(overrides)
  return transformers.GemmaConfig(**fields)


def _randomize(module, seed: int, std: float) -> None:
  """Redraw every weight (the default init makes near-constant rewards)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * std)


def _save(model, path: Path, tokenizer_dir: str | Path | None) -> Path:
  model.save_pretrained(str(path))
  if tokenizer_dir is not None:
    for f in Path(tokenizer_dir).iterdir():
      shutil.copy(f, path / f.name)
  return path


def make_policy_dir(
  path: str | Path, tokenizer_dir: str | Path, seed: int = 0, **config_overrides
) -> Path:
  """A random tiny GemmaForCausalLM (vocab = the tokenizer's) with the tokenizer beside it."""
  import transformers

  cfg = _gemma_config(tokenizer_vocab_size(tokenizer_dir), **config_overrides)
  model = transformers.GemmaForCausalLM(cfg).float().eval()
  _randomize(model, seed, std=0.1)
  return _save(model, Path(path), tokenizer_dir)


def make_reward_dir(
  path: str | Path, tokenizer_dir: str | Path, seed: int = 1, **config_overrides
) -> Path:
  """A random tiny GemmaForSequenceClassification with one label, tokenizer beside it."""
  import transformers

  cfg = _gemma_config(tokenizer_vocab_size(tokenizer_dir), num_labels=1, **config_overrides)
  model = transformers.GemmaForSequenceClassification(cfg).float().eval()
  _randomize(model, seed, std=0.3)
  return _save(model, Path(path), tokenizer_dir)


@contextlib.contextmanager
def mock_tfds(num_examples: int = 20) -> Iterator[None]:
  """Random examples for any TFDS builder read with `tfds.data_source`, generated from
  its feature spec (text features are random letter strings)."""
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def write_jsonl(path: str | Path, texts: Iterable[str], field: str = 'prompt') -> Path:
  path = Path(path)
  path.write_text(''.join(json.dumps({field: t, 'id': i}) + '\n' for i, t in enumerate(texts)))
  return path
