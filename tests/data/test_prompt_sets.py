"""The shipped sentiment prompt sets: what scripts/make_sentiment_prompts.py writes, 1,000
training and 200 held-out prompts about disjoint subjects, each read whole by the loader."""

import importlib.util
import json
import pathlib

from bond_jax.data import prompts as data

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDER = ROOT / 'bond_jax' / 'data' / 'prompt_sets'


def _generator():
  path = ROOT / 'scripts' / 'make_sentiment_prompts.py'
  spec = importlib.util.spec_from_file_location('make_sentiment_prompts', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_files_are_the_generators_output():
  gen = _generator()
  train, heldout = gen.make()
  for name, texts in (('sentiment_train', train), ('sentiment_heldout', heldout)):
    assert data.jsonl_texts(str(FOLDER / f'{name}.jsonl'), 'prompt') == texts
  assert (len(train), len(heldout)) == (1000, 200)
  assert len(set(train)) == 1000 and len(set(heldout)) == 200


def test_held_out_prompts_are_about_other_subjects():
  gen = _generator()
  assert not set(gen.TRAIN_SUBJECTS) & set(gen.HELDOUT_SUBJECTS)
  train, heldout = gen.make()
  for text in heldout:
    assert not any(s in text for s in gen.TRAIN_SUBJECTS), text
    assert any(s.lower() in text.lower() for s in gen.HELDOUT_SUBJECTS), text
  # Every prompt stops where the opinion would start.
  assert all(t.rstrip().split()[-1] in ('was', 'be', 'felt', 'seemed', 'is') for t in train)


def test_jsonl_lines_hold_only_the_prompt():
  for name in ('sentiment_train', 'sentiment_heldout'):
    for line in (FOLDER / f'{name}.jsonl').read_text().splitlines():
      assert list(json.loads(line)) == ['prompt']
