"""Sweeps (expansion, naming, validation of every member, skip-when-done, manifest and
commands) and plots of real workdirs."""

import json
import pathlib
import shlex

import matplotlib.image
import pytest

from bond_jax.eval import plots
from bond_jax.run import loop as trainer
from bond_jax.run import sweep
from bond_jax.types import ConfigError
from tests.run.test_loop import micro_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIG6 = ROOT / 'configs' / 'jbond_tiny_fig6.py'


def _sweep_file(tmp_path, members: str) -> pathlib.Path:
  path = tmp_path / 'my_sweep.py'
  path.write_text(
    'import pathlib\n'
    'from bond_jax.run import config as config_lib\n'
    'from bond_jax.run import sweep\n'
    'def get_config():\n'
    f'  return config_lib.load_config_file({str(ROOT / "configs" / "jbond_tiny.py")!r})\n'
    f'def get_sweep():\n  return {members}\n'
  )
  return path


def test_grid_and_zip_expand_in_order():
  assert sweep.grid({'a.x': [1, 2], 'b.y': [3, 4, 5]}) == [
    {'a.x': 1, 'b.y': 3}, {'a.x': 1, 'b.y': 4}, {'a.x': 1, 'b.y': 5},
    {'a.x': 2, 'b.y': 3}, {'a.x': 2, 'b.y': 4}, {'a.x': 2, 'b.y': 5},
  ]  # fmt: skip
  assert sweep.zipped({'a.x': [1, 2], 'b.y': [3, 4]}) == [
    {'a.x': 1, 'b.y': 3},
    {'a.x': 2, 'b.y': 4},
  ]
  with pytest.raises(ConfigError, match='one length'):
    sweep.zipped({'a.x': [1, 2], 'b.y': [3]})


def test_fig6_sweep_expands_to_16_validated_named_members(tmp_path):
  members = sweep.expand(FIG6)
  assert len(members) == 16
  assert members[0].name == 'eta_0.01-gamma_0.0' and members[-1].name == 'eta_0.1-gamma_2.0'
  assert len({m.name for m in members}) == 16
  assert {(m.config.bond.eta, m.config.bond.gamma) for m in members} == {
    (e, g) for e in (0.01, 0.02, 0.05, 0.1) for g in (0.0, 0.5, 1.0, 2.0)
  }
  # Each printed command is scripts/train.py with the member's overrides and workdir.
  line = sweep.main(str(FIG6), str(tmp_path), 'print', 'launch --job={name} -- {command}')[5]
  name, argv = line.split(' -- ')
  assert name == 'launch --job=eta_0.02-gamma_0.5'
  assert shlex.split(argv) == [
    'python', 'scripts/train.py', f'--config={FIG6}', f'--workdir={tmp_path / members[5].name}',
    '--config.bond.eta=0.02', '--config.bond.gamma=0.5',
  ]  # fmt: skip
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  assert [r['name'] for r in manifest['runs']] == [m.name for m in members]
  assert len(manifest['git_revision']) in (40, len('unknown'))


def test_a_bad_member_fails_the_whole_sweep_naming_it(tmp_path):
  typo = _sweep_file(tmp_path, "[{'bond.eta': 0.1}, {'bond.etaa': 0.2}]")
  with pytest.raises(
    ConfigError,
    match=r"sweep member 1 .*config.bond has no field 'etaa' \(did you mean config.bond.eta\?\)",
  ):
    sweep.expand(typo)
  out_of_range = _sweep_file(tmp_path, "sweep.grid({'bond.beta': [0.5, 1.5]})")
  with pytest.raises(ConfigError, match=r'sweep member 1 .*config.bond.beta=1.5 is invalid'):
    sweep.main(str(out_of_range), str(tmp_path / 'root'), 'print')
  assert not (tmp_path / 'root' / 'manifest.json').exists()  # nothing was launched
  no_sweep = ROOT / 'configs' / 'jbond_tiny.py'
  with pytest.raises(ConfigError, match='declares no sweep'):
    sweep.expand(no_sweep)


def test_finished_runs_are_skipped_and_collected(tmp_path, monkeypatch):
  members = sweep.expand(FIG6)
  done = tmp_path / members[3].name
  done.mkdir(parents=True)
  (done / 'summary.json').write_text(json.dumps({'reward_policy': 6.0, 'kl_policy_ref': 2.0}))
  lines = sweep.launch_lines(FIG6, tmp_path, members)
  assert len(lines) == 15 and not any(members[3].name in line for line in lines)
  # Local mode runs only the unfinished ones (the subprocess is replaced by a recorder).
  ran = []
  monkeypatch.setattr(
    sweep.subprocess, 'run', lambda argv, cwd: ran.append(argv) or type('P', (), {'returncode': 0})
  )
  results = sweep.run_local(FIG6, tmp_path, members[:5])
  assert [r[1] for r in results] == ['ok', 'ok', 'ok', 'done before', 'ok'] and len(ran) == 4
  rows = sweep.collect(tmp_path, members[:5])
  assert rows[3]['summary']['reward_policy'] == 6.0 and rows[0]['summary'] is None
  table = sweep.format_collected(rows)
  assert '6.000' in table and '(not finished)' in table


def test_plots_of_two_real_workdirs_decode(tmp_path):
  """Two micro runs that also evaluate during training (eval/ metrics every 2 steps, the
  same estimates as the final table), then every plot from their workdirs."""
  for seed in (0, 1):
    c = micro_config(4)
    c.seed, c.eval.every, c.eval.every_num_prompts = seed, 2, 4
    summary = trainer.run(c, tmp_path / f'seed{seed}')
  rows = [
    json.loads(line) for line in (tmp_path / 'seed1' / 'metrics.jsonl').read_text().splitlines()
  ]
  evaluated = [r for r in rows if 'eval/reward_policy' in r]
  assert [r['step'] for r in evaluated] == [2, 4]
  for key in ('eval/kl_ref', 'eval/log_quantile', 'eval/win_rate', 'eval/kl_bwd', 'eval/kl_fwd'):
    assert all(isinstance(r[key], float) for r in evaluated), key
  assert 0.0 <= evaluated[-1]['eval/win_rate'] <= 1.0 and evaluated[-1]['eval/log_quantile'] <= 0
  # At the last step the evaluation during training is the final table on fewer prompts.
  assert summary['step'] == 4 and 'kl_bwd' in summary and summary['kl_n'] == 4
  written = plots.plot_workdirs([tmp_path / 'seed0', tmp_path / 'seed1'], tmp_path / 'plots', 1)
  names = {p.name for p in written}
  assert names == {'reward.png', 'kl.png', 'tradeoff.png', 'log_quantile.png'}
  for path in written:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas
  with pytest.raises(FileNotFoundError, match='is it a bond_jax workdir'):
    plots.plot_workdirs([tmp_path], tmp_path / 'none')
