"""Prompt datasets for Hugging Face policies: TFDS or local JSONL -> left-padded batches.

A `PromptStream` turns a sequence of texts into batches of prompt ids:

  text -> prompt_template ('Summarize:\\n{text}\\nSummary:') -> tokenizer (chat
  template, BOS) -> overlong prompts dropped or their *text* truncated -> left
  padding to max_prompt_len (static shapes; the sampler wants left padding so
  every row writes its next token into the same cache slot).

Order. Epoch e visits the examples in the permutation drawn from
(shuffle_seed, e); batches run on across epoch boundaries. The position is
(epoch, index into that permutation), a JSON-able dict: `state()` saved in a
checkpoint and `restore()`d gives the next unseen batch, exactly as an
uninterrupted stream would.

Multi-host. All processes walk the same global order and build the same global
batch of `global_batch` prompts (dropping the same overlong ones); process i of
n keeps rows [i * global_batch / n, (i + 1) * global_batch / n). The state is
therefore global, identical on every host, and independent of the number of
hosts: a run can resume on a different topology. The price is that every host
tokenizes the whole global batch, which is small next to a policy step.

TFDS is read with `tfds.data_source` (random access over array_record files),
which needs no TensorFlow. Prepare a dataset once, where there is internet:
  tfds build xsum --file_format=array_record --data_dir=/data/tfds
Nothing is downloaded at run time (`download=False`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from bond_jax.data.tokenizer import Tokenizer
from bond_jax.types import ConfigError

OVERLONG = ('drop', 'truncate')
# TFDS registers the builders of these packages only when they are imported.
_TFDS_PACKAGES = ('summarization', 'text', 'question_answering', 'translate', 'text_simplification')


def _text(value: Any, field: str, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, str):
    return value
  raise ConfigError(f'config.{field}: {where} holds a {type(value).__name__}, not text.')


class _TfdsTexts(Sequence):
  """One text feature of a TFDS data source, as str."""

  def __init__(self, source: Any, feature: str, where: str):
    self._source, self._feature, self._where = source, feature, where

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    return _text(self._source[i][self._feature], 'data.text_field', self._where)


def _splits(tfds: Any, name: str, data_dir: str) -> list[str]:
  """The prepared splits of a TFDS dataset, or [] when its info cannot be read."""
  try:
    return sorted(tfds.builder(name, data_dir=data_dir or None).info.splits)
  except Exception:  # noqa: BLE001 (only used to word an error)
    return []


def tfds_texts(
  name: str, split: str, feature: str, data_dir: str = '', split_field: str = 'data.split'
) -> Sequence[str]:
  """The `feature` text of every example of a prepared TFDS split (lazy, random access)."""
  import tensorflow_datasets as tfds

  for package in _TFDS_PACKAGES:
    importlib.import_module(f'tensorflow_datasets.{package}')
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f'config.data.tfds_name={name!r} is invalid: no such TFDS builder.') from e
  except (NotImplementedError, AssertionError, FileNotFoundError, ValueError) as e:
    available = _splits(tfds, name, data_dir)
    if isinstance(e, ValueError) and 'split' in str(e).lower() and available:
      raise ConfigError(
        f'config.{split_field}={split!r} is invalid: TFDS {name} in '
        f'{data_dir or "the default TFDS data_dir"} has the splits {available}.'
      ) from e
    raise ConfigError(
      f'config.data.tfds_name={name!r} split {split!r} is not available as array_record in '
      f'{data_dir or "the default TFDS data_dir"}: prepare it once with `tfds build {name} '
      f'--file_format=array_record --data_dir=...` and set config.data.tfds_data_dir '
      f'({type(e).__name__}: {str(e).splitlines()[0]}).'
    ) from e
  where = f'TFDS {name}/{split}'
  if len(source) == 0:
    raise ConfigError(f'config.{split_field}={split!r}: {where} is empty.')
  first = source[0]
  if feature not in first:
    raise ConfigError(
      f'config.data.text_field={feature!r} is invalid: {where} has features {sorted(first)}.'
    )
  return _TfdsTexts(source, feature, where)


def jsonl_texts(path: str, field: str, path_field: str = 'data.jsonl_path') -> list[str]:
  """`field` of every object of a JSONL file (one object per line; blank lines skipped).

  A line that is not UTF-8, not JSON, not an object or lacks `field` is a ConfigError that
  names the file and the line."""
  if not path or not Path(path).is_file():
    raise ConfigError(
      f'config.{path_field}={path!r} is invalid: not a file (a local JSONL '
      'file, one JSON object per line).'
    )
  texts = []
  line_no = 0
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ConfigError(f'{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start}).') from e
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(
          f'{path}:{line_no}: not valid JSON ({e.msg}); config.{path_field} must name a JSONL file.'
        ) from e
      if not isinstance(obj, dict):
        raise ConfigError(
          f'{path}:{line_no}: a JSON {type(obj).__name__}, not an object; config.{path_field} '
          'must name a JSONL file of objects.'
        )
      if field not in obj:
        raise ConfigError(
          f'config.data.jsonl_field={field!r} is invalid: {path}:{line_no} has '
          f'no such key (keys: {sorted(obj)}).'
        )
      texts.append(_text(obj[field], 'data.jsonl_field', f'{path}:{line_no}'))
  if not texts:
    what = 'the file is empty' if line_no == 0 else f'its {line_no} lines are blank'
    raise ConfigError(f'config.{path_field}={path!r} is invalid: no examples ({what}).')
  return texts


class PromptStream:
  """Batches of left-padded prompt ids in a seeded, resumable, per-host order."""

  def __init__(
    self,
    texts: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_prompt_len: int,
    global_batch: int,
    prompt_template: str = '{text}',
    overlong: str = 'drop',
    shuffle_seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    source: str = 'the dataset',
    bucket: int = 0,
  ):
    """`source` names the texts in errors (a file, a TFDS split). `bucket` > 0: a batch is
    padded to its longest prompt rounded up to a multiple of `bucket` (at most
    max_prompt_len), not to max_prompt_len, so short prompts cost less and the step sees at
    most max_prompt_len / bucket distinct shapes; every process pads to the same width (each
    reads the whole global batch)."""
    if overlong not in OVERLONG:
      raise ConfigError(f'config.data.overlong={overlong!r} is invalid: one of {OVERLONG}.')
    if '{text}' not in prompt_template:
      raise ConfigError(
        f"config.data.prompt_template={prompt_template!r} is invalid: it must contain '{{text}}'."
      )
    if global_batch <= 0 or global_batch % process_count:
      raise ConfigError(
        f'config.train.batch_size={global_batch} is invalid: must be > 0 and '
        f'divisible by the number of processes ({process_count}).'
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
    if len(texts) == 0:
      raise ConfigError(f'The prompt dataset ({source}) is empty.')
    self.texts, self.tokenizer = texts, tokenizer
    self.max_prompt_len, self.global_batch = max_prompt_len, global_batch
    self.prompt_template, self.overlong = prompt_template, overlong
    self.shuffle_seed, self.shuffle = shuffle_seed, shuffle
    self.local_batch = global_batch // process_count
    self._rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
    self.source = source
    if not isinstance(bucket, int) or bucket < 0:
      raise ConfigError(
        f'config.data.prompt_bucket={bucket!r} is invalid: 0 (pad to data.max_prompt_len) or '
        'a positive number of tokens.'
      )
    self.bucket = bucket
    self.num_dropped = 0  # overlong prompts skipped so far by this object (not checkpointed)
    self._shortest_dropped: int | None = None  # tokens of the shortest overlong prompt
    self._epoch, self._index = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    n = len(self.texts)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.shuffle_seed, epoch]).permutation(n)

  def _render(self, text: str) -> str:
    return self.prompt_template.replace('{text}', text)

  def encode(self, text: str) -> list[int] | None:
    """Prompt ids of one example, or None when it is dropped (empty, or overlong with 'drop').

    'truncate' shortens the example's text, never the template around it, so the
    instruction ('Summary:') and the chat template's generation prompt survive.
    """
    p = self.max_prompt_len
    ids = self.tokenizer.encode(self._render(text))
    if len(ids) <= p:
      return ids or None
    if self.overlong == 'drop':
      self._shortest_dropped = min(len(ids), self._shortest_dropped or len(ids))
      return None
    overhead = len(self.tokenizer.encode(self._render('')))  # template, chat template, BOS
    keep = p - overhead
    while keep >= 0:
      ids = self.tokenizer.encode(self._render(self.tokenizer.truncate_text(text, keep)))
      if len(ids) <= p:
        return ids or None
      keep -= len(ids) - p  # merges across the cut can add tokens: cut more
    raise ConfigError(
      f'config.data.max_prompt_len={p} is invalid: the prompt template and '
      f'chat template alone take {overhead} tokens.'
    )

  def _next_global(self) -> list[list[int]]:
    n = len(self.texts)
    out: list[list[int]] = []
    rejected_in_a_row = 0
    while len(out) < self.global_batch:
      if self._index == n:
        self._epoch, self._index = self._epoch + 1, 0
        self._order = self._permutation(self._epoch)
      ids = self.encode(self.texts[int(self._order[self._index])])
      self._index += 1
      if ids is None:
        self.num_dropped += 1
        rejected_in_a_row += 1
        if rejected_in_a_row > n:
          shortest = (
            f' (the shortest takes {self._shortest_dropped} tokens with the template)'
            if self._shortest_dropped
            else ''
          )
          raise ConfigError(
            f'config.data.max_prompt_len={self.max_prompt_len} is invalid: no prompt of '
            f"{self.source} fits{shortest}; raise it or set data.overlong='truncate'."
          )
        continue
      rejected_in_a_row = 0
      out.append(ids)
    return out

  def width(self, rows: Sequence[Sequence[int]]) -> int:
    """The padded width of a batch: max_prompt_len, or its bucket (see `bucket`)."""
    if not self.bucket:
      return self.max_prompt_len
    longest = max((len(ids) for ids in rows), default=1)
    return min(self.max_prompt_len, -(-max(longest, 1) // self.bucket) * self.bucket)

  def pad(
    self, rows: Sequence[Sequence[int]], width: int | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad rows to `width` (default max_prompt_len): (prompt_BxP int32, valid_BxP bool)."""
    p = width or self.max_prompt_len
    prompt_BxP = np.full((len(rows), p), self.tokenizer.ids.pad_id, np.int32)
    valid_BxP = np.zeros((len(rows), p), bool)
    for i, ids in enumerate(rows):
      if ids:
        prompt_BxP[i, p - len(ids) :] = ids
        valid_BxP[i, p - len(ids) :] = True
    return prompt_BxP, valid_BxP

  def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the next global batch: (prompt_BxP int32, valid_BxP bool),
    P = `width` of the global batch."""
    rows = self._next_global()
    return self.pad(rows[self._rows], self.width(rows))

  def state(self) -> dict[str, int]:
    """The position before the next batch (JSON-able; the same on every process)."""
    return {
      'epoch': self._epoch,
      'index': self._index,
      'num_examples': len(self.texts),
      'shuffle_seed': self.shuffle_seed,
    }

  def restore(self, state: dict[str, int]) -> None:
    """Continue from a `state()`; the dataset and seed must be the ones it was taken with."""
    for key, want in (('num_examples', len(self.texts)), ('shuffle_seed', self.shuffle_seed)):
      if state.get(key) != want:
        raise ValueError(
          f'Data state {state} was saved with {key}={state.get(key)}, but this '
          f'stream has {key}={want}: the dataset or data.shuffle_seed changed.'
        )
    epoch, index = int(state['epoch']), int(state['index'])
    if epoch < 0 or not 0 <= index <= len(self.texts):
      raise ValueError(f'Data state {state} is out of range.')
    self._epoch, self._index = epoch, index
    self._order = self._permutation(epoch)


def source_name(data_cfg: ml_collections.ConfigDict, eval_split: bool = False) -> str:
  """What errors call the configured texts: the JSONL file or the TFDS split."""
  d = data_cfg
  if d.source == 'tfds':
    return f'TFDS {d.tfds_name}/{(d.eval_split or d.split) if eval_split else d.split}'
  return (d.eval_jsonl_path if eval_split and d.eval_jsonl_path else d.jsonl_path) or 'the dataset'


def source_texts(data_cfg: ml_collections.ConfigDict, eval_split: bool = False) -> Sequence[str]:
  """The configured dataset's texts (training, or the evaluation split / file)."""
  d = data_cfg
  if d.source == 'tfds':
    split_field = 'data.eval_split' if eval_split and d.eval_split else 'data.split'
    split = d.eval_split if split_field == 'data.eval_split' else d.split
    return tfds_texts(d.tfds_name, split, d.text_field, d.tfds_data_dir, split_field)
  if d.source == 'jsonl':
    if eval_split and d.eval_jsonl_path:
      return jsonl_texts(d.eval_jsonl_path, d.jsonl_field, 'data.eval_jsonl_path')
    return jsonl_texts(d.jsonl_path, d.jsonl_field)
  raise ConfigError(f"config.data.source={d.source!r} is invalid: one of ('tfds', 'jsonl').")


def from_config(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Tokenizer,
  process_index: int,
  process_count: int,
  global_batch: int,
) -> PromptStream:
  """The training stream of this process (pass jax.process_index(), jax.process_count())."""
  d = data_cfg
  return PromptStream(
    source_texts(d),
    tokenizer,
    max_prompt_len=d.max_prompt_len,
    global_batch=global_batch,
    prompt_template=d.prompt_template,
    overlong=d.overlong,
    shuffle_seed=d.shuffle_seed,
    process_index=process_index,
    process_count=process_count,
    source=source_name(d),
    bucket=d.get('prompt_bucket', 0),
  )


def eval_prompts(
  data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, num_prompts: int
) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_prompts` usable prompts of the evaluation split, in stored order.

  Every process gets the same rows. With data.overlong='drop', examples that do not
  fit are skipped (and the split wraps around if too few fit).
  """
  d = data_cfg
  texts = source_texts(d, eval_split=True)
  if num_prompts > len(texts):
    raise ConfigError(
      f'config.eval.num_prompts={num_prompts} is invalid: the evaluation data '
      f'has only {len(texts)} examples.'
    )
  stream = PromptStream(
    texts,
    tokenizer,
    max_prompt_len=d.max_prompt_len,
    global_batch=num_prompts,
    prompt_template=d.prompt_template,
    overlong=d.overlong,
    shuffle=False,
    source=source_name(d, eval_split=True),
  )
  return stream.next_batch()
