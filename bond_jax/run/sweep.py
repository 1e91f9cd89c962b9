"""Sweeps: a config file declares them, this module expands, validates, names, launches and
collects them.

A config file declares a sweep with a `get_sweep()` function next to `get_config()`,
returning a list of override dicts (dotted field -> value); `grid` builds the product of
lists, `zipped` walks lists together:

  def get_sweep():
    return sweep.grid({'bond.eta': [0.01, 0.02, 0.05, 0.1], 'bond.gamma': [0.0, 0.5, 1.0, 2.0]})

Each member is the config with its overrides applied; every member is validated before
anything runs, so a typo fails the whole sweep at once. A member's workdir is named from
its overrides (`eta_0.01-gamma_0.5`), and its command is the one `scripts/train.py` takes,
so a cluster launcher can run the printed lines as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from bond_jax.run import config as config_lib
from bond_jax.types import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUMMARY = 'summary.json'  # written by a run only when it has finished


def grid(axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Every combination of the values of `axes` (the last field varies fastest)."""
  fields = list(axes)
  return [dict(zip(fields, values, strict=True)) for values in itertools.product(*axes.values())]


def zipped(axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Members whose i-th values are taken together from each list (all the same length)."""
  lengths = {len(v) for v in axes.values()}
  if len(lengths) != 1:
    raise ConfigError(f'sweep lists must have one length, got {sorted(lengths)} for {list(axes)}')
  return [dict(zip(axes, values, strict=True)) for values in zip(*axes.values(), strict=True)]


@dataclasses.dataclass(frozen=True)
class Member:
  name: str  # the workdir's name under the sweep's root
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict


def _format(value: Any) -> str:
  return json.dumps(value) if isinstance(value, str | bool) or value is None else repr(value)


def member_name(overrides: dict[str, Any]) -> str:
  """`eta_0.01-gamma_0.5`: leaf names, unless two fields share one (then the dotted path).

  No '=' or ',' in it: TensorBoard's --logdir_spec and some shells treat them specially.
  """
  leaves = [field.rsplit('.', 1)[-1] for field in overrides]
  keys = leaves if len(set(leaves)) == len(leaves) else list(overrides)
  parts = [f'{key}_{value}' for key, value in zip(keys, overrides.values(), strict=True)]
  name = '-'.join(parts) or 'base'
  return re.sub(r'[^A-Za-z0-9_.+-]', '', name)


def apply_overrides(
  c: ml_collections.ConfigDict, overrides: dict[str, Any], where: str
) -> ml_collections.ConfigDict:
  """A copy of `c` with dotted-field overrides; an unknown field is a ConfigError."""
  c = ml_collections.ConfigDict(c.to_dict())
  for field, value in overrides.items():
    problem = config_lib.unknown_field(c, field)
    if problem:
      raise ConfigError(f'{where}: --config.{field}: {problem}')
    *path, leaf = field.split('.')
    node = c
    for part in path:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], float) else value
  return c


def expand(config_path: str | pathlib.Path, check_devices: bool = True) -> list[Member]:
  """The sweep's members, each validated (run.config.validate) before anything runs."""
  config_path = pathlib.Path(config_path)
  module = config_lib.load_config_module(config_path)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{config_path} declares no sweep: add get_sweep() returning overrides.')
  base = module.get_config()
  members, names = [], set()
  for i, overrides in enumerate(module.get_sweep()):
    where = f'sweep member {i} {overrides}'
    c = apply_overrides(base, overrides, where)
    try:
      config_lib.validate(c, check_devices=check_devices)
    except ConfigError as e:
      raise ConfigError(f'{where}: {e}') from None
    name = member_name(overrides)
    if name in names:
      raise ConfigError(f'{where}: two members are both named {name!r}')
    names.add(name)
    members.append(Member(name=name, overrides=dict(overrides), config=c))
  if not members:
    raise ConfigError(f'{config_path}: get_sweep() returned no members.')
  return members


def command(config_path: str | pathlib.Path, root: str | pathlib.Path, member: Member) -> str:
  """The `scripts/train.py` command line that runs `member` into root/member.name."""
  args = [
    'python',
    'scripts/train.py',
    f'--config={config_path}',
    f'--workdir={pathlib.Path(root) / member.name}',
  ]
  args += [f'--config.{field}={_format(value)}' for field, value in member.overrides.items()]
  return shlex.join(args)


def is_done(root: str | pathlib.Path, member: Member) -> bool:
  return (pathlib.Path(root) / member.name / SUMMARY).is_file()


def _git_revision() -> str:
  try:
    out = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def write_manifest(
  config_path: str | pathlib.Path, root: str | pathlib.Path, members: Iterable[Member]
) -> pathlib.Path:
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  manifest = {
    'config': str(config_path),
    'git_revision': _git_revision(),
    'created': time.strftime('%Y-%m-%dT%H:%M:%S'),
    'runs': [
      {'name': m.name, 'overrides': m.overrides, 'command': command(config_path, root, m)}
      for m in members
    ],
  }
  path = root / 'manifest.json'
  path.write_text(json.dumps(manifest, indent=2))
  return path


def launch_lines(
  config_path: str | pathlib.Path, root: str | pathlib.Path, members: Iterable[Member],
  launcher: str = '{command}',
) -> list[str]:  # fmt: skip
  """One line per member not yet done: `launcher` with {command} and {name} filled in."""
  return [
    launcher.format(command=command(config_path, root, m), name=m.name)
    for m in members
    if not is_done(root, m)
  ]


def run_local(
  config_path: str | pathlib.Path, root: str | pathlib.Path, members: Sequence[Member]
) -> list[tuple[str, str, float]]:
  """Run the members one after another in subprocesses, skipping finished ones (an
  interrupted sweep resumes: each run also resumes from its own checkpoints)."""
  results = []
  for i, m in enumerate(members):
    if is_done(root, m):
      results.append((m.name, 'done before', 0.0))
      continue
    print(f'[sweep] {i + 1}/{len(members)} {m.name}', flush=True)
    t0 = time.time()
    argv = shlex.split(command(config_path, root, m))
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT)
    status = 'ok' if proc.returncode == 0 else f'failed ({proc.returncode})'
    results.append((m.name, status, time.time() - t0))
    if proc.returncode != 0:
      print(f'[sweep] {m.name} {status}; the other runs go on', flush=True)
  return results


def collect(root: str | pathlib.Path, members: Sequence[Member]) -> list[dict[str, Any]]:
  """Each finished member's overrides and final summary (unfinished ones are listed empty)."""
  rows = []
  for m in members:
    path = pathlib.Path(root) / m.name / SUMMARY
    summary = json.loads(path.read_text()) if path.is_file() else None
    rows.append({'name': m.name, 'overrides': m.overrides, 'summary': summary})
  return rows


def format_collected(rows: Sequence[dict[str, Any]]) -> str:
  fields = [
    ('reward_policy', 'reward'),
    ('kl_policy_ref', 'KL(pi||ref)'),
    ('log_quantile', 'log q'),
    ('win_rate', 'win rate'),
    ('matches_bon_n', 'BoN-N'),
  ]
  width = max([len(r['name']) for r in rows] + [4])
  lines = [f'{"run":<{width}}' + ''.join(f'{title:>13}' for _, title in fields)]
  for r in rows:
    s = r['summary']
    if s is None:
      lines.append(f'{r["name"]:<{width}}' + f'{"(not finished)":>13}')
      continue
    cells = [s.get(key) for key, _ in fields]
    lines.append(
      f'{r["name"]:<{width}}'
      + ''.join(f'{v:>13.3f}' if isinstance(v, float) else f'{v!s:>13}' for v in cells)
    )
  return '\n'.join(lines)


def main(
  config_path: str, root: str, mode: str = 'print', launcher: str = '{command}'
) -> list[Any]:
  """What scripts/sweep.py does: expand and validate, write the manifest, then print the
  launch lines, run them here, or collect their summaries."""
  if mode not in ('print', 'local', 'collect'):
    raise ConfigError(f'--mode={mode!r} is invalid: one of print, local, collect.')
  members = expand(config_path, check_devices=mode == 'local')
  if mode == 'collect':
    rows = collect(root, members)
    print(format_collected(rows), flush=True)
    (pathlib.Path(root) / 'collected.json').write_text(json.dumps(rows, indent=2))
    return rows
  write_manifest(config_path, root, members)
  if mode == 'print':
    lines = launch_lines(config_path, root, members, launcher)
    print('\n'.join(lines), flush=True)
    return lines
  results = run_local(config_path, root, members)
  for name, status, seconds in results:
    print(f'[sweep] {name}: {status} in {seconds:.0f}s', flush=True)
  if any(status.startswith('failed') for _, status, _ in results):
    sys.exit('error: some sweep runs failed (see above); rerun to retry them.')
  return results
