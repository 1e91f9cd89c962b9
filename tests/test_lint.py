"""ruff (configured in pyproject.toml) is part of the test suite, so CI keeps the tree clean."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.fail('ruff is not installed: pip install -r requirements-test.txt')
  result = subprocess.run([ruff, 'check', '.'], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
