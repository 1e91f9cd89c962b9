"""The paper's Fig. 2, 4, 5 and 7 as runnable comparisons: configurations, plots, claim checks.

`figure(name, out_dir, parts)` runs every curve of the figure on the parts asked
('testbed': exact metrics; 'lm': the tiny noisy-copy task, Monte-Carlo metrics),
writes `<name>.json` (all curves, the settings and the claim checks with their
numbers) and `<name>.png`, and returns the JSON dict; `scripts/reproduce.py
--figure=2|4|5|7` is its command line. "final" below is the mean of the last 3
evaluations, to damp the LM's Monte-Carlo noise.

Settings are chosen for a 2-core CPU (each figure a few minutes); the paper's
are in ALGORITHMS.md section 8. Where a claim does not reproduce, the check
says False and the JSON has the numbers: nothing is tuned per claim after the fact.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bond_jax.eval import plots, testbed
from bond_jax.repro import experiments as ex

Curves = dict[str, ex.Curve]
PARTS = ('testbed', 'lm')


def _final(curve: ex.Curve, key: str, last: int = 3) -> float:
  return float(np.mean(curve[key][-last:]))


def _at_x(curve: ex.Curve, x_key: str, x: float, y_key: str) -> float | None:
  """y of the curve at x = `x`, interpolated in the curve's points sorted by x (None if
  x is outside the range the curve covers)."""
  xs, ys = np.asarray(curve[x_key]), np.asarray(curve[y_key])
  order = np.argsort(xs)
  if not xs.min() <= x <= xs.max():
    return None
  return float(np.interp(x, xs[order], ys[order]))


def _gap(a: ex.Curve, b: ex.Curve, x_key: str, y_key: str) -> float | None:
  """Mean over b's points inside a's x-range of a's y (interpolated at b's x) minus b's y:
  how far curve a lies above curve b where both exist (None if they never overlap)."""
  diffs = [
    ya - yb
    for xb, yb in zip(b[x_key], b[y_key], strict=True)
    if (ya := _at_x(a, x_key, xb, y_key)) is not None
  ]
  return float(np.mean(diffs)) if diffs else None


# ---------------------------------------------------------------------------
# Runners: one per part, configured by the figure.


@functools.cache
def _testbed(tied: bool) -> tuple[testbed.Testbed, Any]:
  return testbed.make(seed=0, num_prompts=2, tied=tied)


@functools.cache
def _lm() -> ex.LMTask:
  return ex.lm_task(ex.load_config('jbond_tiny.py'))


_SETTINGS: dict[str, Any] = {}  # what each part of the figure being run used (for the JSON)


def _run_testbed(runs: dict[str, dict], *, tied: bool, eval_n: int, **kw) -> Curves:
  _SETTINGS['testbed'] = dict(runs=runs, tied=tied, eval_n=eval_n, num_prompts=2, **kw)
  tb, ref = _testbed(tied)
  return {
    label: ex.testbed_curve(tb, ref, knobs, eval_n=eval_n, label=label, **kw)
    for label, knobs in runs.items()
  }


def _run_lm(
  runs: dict[str, tuple[str, dict]], *, eval_n: int | None, eval_every: int = 25
) -> Curves:
  """runs: label -> (config file, dotted overrides). Every run starts from the same pi_ref."""
  _SETTINGS['lm'] = dict(
    runs=runs,
    base_pi_ref='jbond_tiny.py',
    eval_n=eval_n,
    eval_every=eval_every,
    eval_prompts=64,
    eval_ref_samples=32,
    eval_policy_samples=4,
  )
  lm = _lm()
  evaluate = ex.lm_evaluator(lm, n=eval_n)
  return {
    label: ex.lm_curve(
      lm, ex.load_config(name, overrides), evaluate=evaluate, eval_every=eval_every, label=label
    )
    for label, (name, overrides) in runs.items()
  }


# ---------------------------------------------------------------------------
# Fig. 2: BOND with N = 8 and beta in {0, 0.5, 1}.

_FIG2_TESTBED = {
  f'beta={b}': dict(algorithm='bond', n=8, beta=b, num_quantile_samples=16, anchor='fixed')
  for b in (0.0, 0.5, 1.0)
}


def _fig2_claims(curves: Curves) -> dict[str, Any]:
  f = {
    k: {m: _final(c, m) for m in ('kl_bwd', 'kl_fwd', 'log_quantile')} for k, c in curves.items()
  }
  b0, b5, b1 = f['beta=0.0'], f['beta=0.5'], f['beta=1.0']
  return {
    'final': f,
    'beta0_leaves_backward_kl_higher': b0['kl_bwd'] > b5['kl_bwd'],
    'beta1_leaves_forward_kl_higher': b1['kl_fwd'] > b5['kl_fwd'],
    'beta05_keeps_both_below_the_high_ones': max(b5['kl_bwd'], b5['kl_fwd'])
    < min(b0['kl_bwd'], b1['kl_fwd']),
    'beta05_quantile_above_beta0': b5['log_quantile'] > b0['log_quantile'],
  }


def fig2(parts: tuple[str, ...]) -> dict[str, Any]:
  out = {}
  if 'testbed' in parts:  # the tied (capacity-limited) policy: it cannot represent pi_BoN
    out['testbed'] = _run_testbed(
      _FIG2_TESTBED, tied=True, eval_n=8, steps=1000, batch=64, learning_rate=3e-3, eval_every=50
    )
  if 'lm' in parts:  # configs/bond_tiny.py: N = 8, k = 16, fixed anchor, 300 steps of 32
    out['lm'] = _run_lm(
      {f'beta={b}': ('bond_tiny.py', {'bond.beta': b}) for b in (0.0, 0.5, 1.0)}, eval_n=8
    )
  return out


# ---------------------------------------------------------------------------
# Fig. 4: iterative BOND (n = 2, periodic anchor) against BOND with N = 4, 8, 16.


def _fig4_testbed(period: int) -> dict[str, dict]:
  common = dict(algorithm='bond', beta=0.5, num_quantile_samples=16)
  runs = {f'BOND N={n}': dict(common, n=n, anchor='fixed') for n in (4, 8, 16)}
  runs['iterative BOND n=2'] = dict(common, n=2, anchor='periodic', anchor_period=period)
  return runs


def _fig4_claims(curves: Curves) -> dict[str, Any]:
  it = curves['iterative BOND n=2']
  fixed = {k: c for k, c in curves.items() if k != 'iterative BOND n=2'}

  def second_half_gain(c):
    return _final(c, 'reward') - float(np.interp(c['step'][-1] / 2, c['step'], c['reward']))

  tradeoff = {}
  for k, c in fixed.items():  # iterative BOND's log quantile at each fixed run's final KL
    kl, q = _final(c, 'kl_ref'), _final(c, 'log_quantile')
    q_it = _at_x(it, 'kl_ref', kl, 'log_quantile')
    tradeoff[k] = {'kl_ref': kl, 'log_quantile': q, 'iterative_log_quantile_at_same_kl': q_it}
  return {
    'final_reward': {k: _final(c, 'reward') for k, c in curves.items()},
    'second_half_reward_gain': {k: second_half_gain(c) for k, c in curves.items()},
    'iterative_ends_above_every_fixed_N': all(
      _final(it, 'reward') > _final(c, 'reward') for c in fixed.values()
    ),
    'iterative_gains_more_in_second_half': all(
      second_half_gain(it) > second_half_gain(c) for c in fixed.values()
    ),
    'tradeoff_at_matched_kl': tradeoff,
    'tradeoff_similar_within_0.1_nats': all(
      v['iterative_log_quantile_at_same_kl'] is not None
      and abs(v['iterative_log_quantile_at_same_kl'] - v['log_quantile']) < 0.1
      for v in tradeoff.values()
    ),
  }


def fig4(parts: tuple[str, ...]) -> dict[str, Any]:
  out = {}
  if 'testbed' in parts:
    out['testbed'] = _run_testbed(
      _fig4_testbed(200),
      tied=True,
      eval_n=4,
      steps=2000,
      batch=64,
      learning_rate=3e-3,
      eval_every=100,
    )
  if 'lm' in parts:  # 400 steps of 32 prompts each; the iterative anchor moves every 50
    runs = {
      f'BOND N={n}': ('bond_tiny.py', {'bond.n': n, 'train.num_steps': 400}) for n in (4, 8, 16)
    }
    runs['iterative BOND n=2'] = ('iterative_bond_tiny.py', {})
    out['lm'] = _run_lm(runs, eval_n=None)
  return out


# ---------------------------------------------------------------------------
# Fig. 5: J-BOND with an EMA anchor (eta) against a periodic anchor every 1/eta steps.

_FIG5_TESTBED = {
  'EMA eta=0.02': dict(algorithm='jbond', n=2, anchor='ema', eta=0.02),
  'periodic every 50': dict(algorithm='jbond', n=2, anchor='periodic', anchor_period=50),
}


def _fig5_claims(curves: Curves) -> dict[str, Any]:
  ema, per = curves['EMA eta=0.02'], curves['periodic every 50']
  gain = max(_final(per, 'reward') - per['reward'][0], 1e-9)
  gap = float(np.mean(np.abs(np.subtract(ema['reward'], per['reward']))))
  # The claim is about the trade-off: at the same reward, EMA should sit at a lower KL.
  kl_gap = _gap(per, ema, 'reward', 'kl_ref')  # periodic's KL minus EMA's, at EMA's rewards
  return {
    'final': {k: {m: _final(c, m) for m in ('reward', 'kl_ref')} for k, c in curves.items()},
    'mean_abs_reward_gap_over_training': gap,
    'mean_abs_reward_gap_relative_to_periodic_gain': gap / gain,
    'same_reward_profile_within_15pct_of_gain': gap / gain < 0.15,
    'ema_lower_final_kl': _final(ema, 'kl_ref') < _final(per, 'kl_ref'),
    'periodic_minus_ema_kl_at_matched_reward': kl_gap,
    'ema_reward_minus_periodic_at_matched_kl': _gap(ema, per, 'kl_ref', 'reward'),
    'ema_lower_kl_at_matched_reward_by_0.1_nats': kl_gap is not None and kl_gap > 0.1,
  }


def fig5(parts: tuple[str, ...]) -> dict[str, Any]:
  out = {}
  if 'testbed' in parts:
    out['testbed'] = _run_testbed(
      _FIG5_TESTBED, tied=True, eval_n=4, steps=1500, batch=64, learning_rate=3e-4, eval_every=50
    )
  if 'lm' in parts:  # configs/jbond_tiny.py run for 400 steps of 128 prompts
    runs = {
      'EMA eta=0.02': {'bond.anchor': 'ema', 'bond.eta': 0.02},
      'periodic every 50': {'bond.anchor': 'periodic', 'bond.anchor_period': 50},
    }
    out['lm'] = _run_lm(
      {k: ('jbond_tiny.py', {**v, 'train.num_steps': 400}) for k, v in runs.items()}, eval_n=None
    )
  return out


# ---------------------------------------------------------------------------
# Fig. 7: J-BOND against REINFORCE with beta_RL in {0.001, 0.01, 0.1, 1}.

_FIG7_TESTBED = {
  'J-BOND': dict(algorithm='jbond', n=2, anchor='ema', eta=0.02),
  **{
    f'REINFORCE beta_RL={b}': dict(algorithm='reinforce', beta_rl=b)
    for b in (0.001, 0.01, 0.1, 1.0)
  },
}


def _fig7_claims(curves: Curves) -> dict[str, Any]:
  jb = curves['J-BOND']
  rf = {k: c for k, c in curves.items() if k != 'J-BOND'}
  at_kl = {}
  for k, c in rf.items():
    kl, r = _final(c, 'kl_ref'), _final(c, 'reward')
    at_kl[k] = {
      'kl_ref': kl,
      'reward': r,
      'jbond_reward_at_same_kl': _at_x(jb, 'kl_ref', kl, 'reward'),
    }
  # Whole trajectories: J-BOND's reward minus REINFORCE's at REINFORCE's KLs (where
  # J-BOND's curve reaches them). > 0: J-BOND has the better reward/KL trade-off there.
  gaps = {k: _gap(jb, c, 'kl_ref', 'reward') for k, c in rf.items()}
  rewards = [_final(c, 'reward') for c in rf.values()]  # in increasing beta_RL
  return {
    'final': {k: {m: _final(c, m) for m in ('reward', 'kl_ref')} for k, c in curves.items()},
    'reinforce_final_reward_falls_with_beta_rl': bool(np.all(np.diff(rewards) <= 0.05)),
    'reinforce_final_points_vs_jbond_curve': at_kl,
    'jbond_minus_reinforce_reward_at_matched_kl': gaps,
    'jbond_better_tradeoff_than_every_reinforce': all(
      g is not None and g > 0 for g in gaps.values()
    ),
  }


def fig7(parts: tuple[str, ...]) -> dict[str, Any]:
  out = {}
  if 'testbed' in parts:
    out['testbed'] = _run_testbed(
      _FIG7_TESTBED, tied=True, eval_n=4, steps=1500, batch=64, learning_rate=3e-4, eval_every=50
    )
  if 'lm' in parts:  # configs/jbond_tiny.py and configs/reinforce_tiny.py, 300 steps of 128
    runs = {'J-BOND': ('jbond_tiny.py', {'train.num_steps': 300})}
    runs.update(
      {
        f'REINFORCE beta_RL={b}': ('reinforce_tiny.py', {'bond.beta_rl': b})
        for b in (0.001, 0.01, 0.1, 1.0)
      }
    )
    out['lm'] = _run_lm(runs, eval_n=None)
  return out


# ---------------------------------------------------------------------------
# Driver: run, check, plot, write.

FIGURES: dict[str, tuple[Callable, Callable, list[tuple[str, str]], str]] = {
  'fig2': (
    fig2,
    _fig2_claims,
    [('step', 'kl_bwd'), ('step', 'kl_fwd'), ('step', 'log_quantile')],
    'BOND N=8: beta = 0 (forward KL), 0.5 (Jeffreys), 1 (backward KL)',
  ),
  'fig4': (
    fig4,
    _fig4_claims,
    [('step', 'reward'), ('step', 'log_quantile'), ('kl_ref', 'log_quantile')],
    'Iterative BOND (n=2, periodic anchor) vs BOND N=4, 8, 16',
  ),
  'fig5': (
    fig5,
    _fig5_claims,
    [('step', 'reward'), ('step', 'kl_ref'), ('kl_ref', 'reward')],
    'J-BOND: EMA anchor vs periodic anchor every 1/eta steps',
  ),
  'fig7': (
    fig7,
    _fig7_claims,
    [('step', 'reward'), ('step', 'kl_ref'), ('kl_ref', 'reward')],
    'J-BOND vs REINFORCE (KL-regularised, 2 samples, leave-one-out)',
  ),
}


def figure(
  name: str, out_dir: str | pathlib.Path, parts: tuple[str, ...] = PARTS
) -> dict[str, Any]:
  """Run figure `name` ('fig2' | 'fig4' | 'fig5' | 'fig7'); write its JSON and PNG."""
  if name not in FIGURES:
    raise ValueError(f'unknown figure {name!r}; choose one of {sorted(FIGURES)}.')
  bad = set(parts) - set(PARTS)
  if bad:
    raise ValueError(f'unknown parts {sorted(bad)}; choose from {PARTS}.')
  run, claims, panels, title = FIGURES[name]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  _SETTINGS.clear()
  results = run(parts)
  report = {
    'figure': name,
    'title': title,
    'wall_time_s': round(time.time() - t0, 1),
    'claims': {part: claims(curves) for part, curves in results.items()},
    'settings': dict(_SETTINGS),
    'curves': results,
  }
  (out_dir / f'{name}.json').write_text(json.dumps(report, indent=1))
  plots.plot_panels(out_dir / f'{name}.png', title, results, panels)
  ex._log(f'{name}: {report["wall_time_s"]}s; wrote {out_dir / name}.json and .png')
  ex._log(json.dumps(report['claims'], indent=1))
  return report
