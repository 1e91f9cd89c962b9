"""Lint, format and layer contracts (configured in pyproject.toml) are part of the test suite,
so CI keeps the tree clean with the README's one test command."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _executable(name: str) -> str | None:
  """The tool installed beside the running interpreter (its virtual environment's bin/,
  found without that environment on PATH), else on PATH."""
  beside = pathlib.Path(sys.executable).parent / name
  return str(beside) if beside.is_file() else shutil.which(name)


@pytest.mark.parametrize(
  'command',
  [('ruff', 'check', '.'), ('ruff', 'format', '--check', '.'), ('lint-imports',)],
  ids=lambda c: ' '.join(c),
)
def test_tree_is_clean(command):
  exe = _executable(command[0])
  if exe is None:
    pytest.fail(f'{command[0]} is not installed: pip install -r requirements-test.txt')
  result = subprocess.run([exe, *command[1:]], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
