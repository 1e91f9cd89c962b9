"""Lint, format and layer contracts (configured in pyproject.toml) are part of the test suite,
so CI keeps the tree clean with the README's one test command."""

import importlib
import pathlib
import pkgutil
import shutil
import subprocess
import sys
import types

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


def test_public_names_match_each_package_and_hide_no_module():
  """Each package's `__all__` names what it holds, and no exported function shadows a
  submodule of the same name (`from bond_jax.eval import bon_table` must stay the module)."""
  problems = []
  for init in sorted((ROOT / 'bond_jax').rglob('__init__.py')):
    name = '.'.join(init.parent.relative_to(ROOT).parts)
    package = importlib.import_module(name)
    problems += [
      f'{name}.{n} is missing' for n in getattr(package, '__all__', ()) if not hasattr(package, n)
    ]
    for sub in pkgutil.iter_modules([str(init.parent)]):
      held = getattr(package, sub.name, None)
      if held is not None and not isinstance(held, types.ModuleType):
        problems.append(f'{name}.{sub.name} is {held!r}, hiding the module {name}.{sub.name}')
  assert not problems, problems
