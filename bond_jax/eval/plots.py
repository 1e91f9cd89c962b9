"""Plots of runs and curves: reward and KL(pi || pi_ref) against step, the reward / KL
trade-off with pi_ref's Best-of-N curve for reference, and the log quantile against step.

`plot_panels` draws any set of curves (dicts of equal-length lists keyed by metric) and is
what the reproductions use; `plot_workdirs` reads training workdirs (metrics.jsonl, and
summary.json for the Best-of-N reference) and writes one PNG per plot.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np

Curve = dict[str, list[float]]
# (x metric, y metric, title) of each workdir plot; training metrics of metrics.jsonl, with
# the held-out evaluation's 'eval/...' metrics preferred where a run logged them.
WORKDIR_PLOTS = {
  'reward': ('step', 'reward_policy', 'Reward of policy samples'),
  'kl': ('step', 'kl_ref', 'KL(pi || pi_ref)'),
  'tradeoff': ('kl_ref', 'reward_policy', 'Reward against KL(pi || pi_ref)'),
  'log_quantile': ('step', 'log_quantile', 'Mean log quantile of policy samples vs pi_ref'),
}


def _pyplot():
  import matplotlib  # plotting is optional at run time: only this module needs it

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_panels(
  path: str | pathlib.Path,
  title: str,
  rows: dict[str, dict[str, Curve]],
  panels: Sequence[tuple[str, str]],
  reference: dict[str, tuple[list[float], list[float], str]] | None = None,
) -> pathlib.Path:
  """A grid: one row per entry of `rows`, one column per (x, y) panel, one line per curve.

  `reference` maps a panel's 'x:y' to (xs, ys, label), drawn dashed in every row.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(
    len(rows), len(panels), figsize=(5 * len(panels), 3.6 * len(rows)), squeeze=False
  )
  for i, (row, curves) in enumerate(rows.items()):
    for j, (x, y) in enumerate(panels):
      ax = axes[i][j]
      for label, curve in curves.items():
        if x in curve and y in curve:
          single = len(curve[x]) == 1  # a final point: draw it large
          style = dict(marker='*', markersize=10) if single else dict(marker='.', markersize=3)
          ax.plot(curve[x], curve[y], linewidth=1, label=label, **style)
      ref = (reference or {}).get(f'{x}:{y}')
      if ref is not None:
        ax.plot(ref[0], ref[1], 'k--', marker='o', markersize=3, linewidth=1, label=ref[2])
      ax.set_xlabel(x)
      ax.set_ylabel(y)
      ax.set_title(f'{row}: {y} vs {x}' if row else f'{y} vs {x}', fontsize=9)
      ax.grid(alpha=0.3)
    axes[i][0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def read_metrics(workdir: str | pathlib.Path, smooth: int = 1) -> Curve:
  """metrics.jsonl as a curve (one list per metric, aligned on 'step'), each training
  metric replaced by its `eval/` twin where the run logged one, then a moving average of
  `smooth` logged points (the ends use the points there are)."""
  rows = [
    json.loads(line)
    for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
    if line.strip()
  ]
  keys = sorted({k for r in rows for k in r})
  curve: Curve = {}
  for key in keys:
    points = [(r['step'], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    if points:
      curve[key] = [v for _, v in points]
      curve[f'{key}@step'] = [s for s, _ in points]
  for key in [k for k in keys if k.startswith('eval/')]:
    curve[key[len('eval/') :]] = curve[key]
    curve[f'{key[len("eval/") :]}@step'] = curve[f'{key}@step']
  if smooth > 1:
    for key in [k for k in curve if not k.endswith('@step') and k != 'step']:
      values = np.asarray(curve[key], float)
      kernel = np.ones(min(smooth, len(values)))
      curve[key] = list(
        np.convolve(values, kernel, 'same') / np.convolve(np.ones_like(values), kernel, 'same')
      )
  return curve


def _pair(curve: Curve, x: str, y: str) -> tuple[list[float], list[float]] | None:
  """The points of y against x, aligned on the step where x is not the step itself."""
  if y not in curve:
    return None
  if x == 'step':
    return curve[f'{y}@step'], curve[y]
  if x not in curve:
    return None
  at_x = dict(zip(curve[f'{x}@step'], curve[x], strict=True))
  pairs = [(at_x[s], v) for s, v in zip(curve[f'{y}@step'], curve[y], strict=True) if s in at_x]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def bon_reference(summary: dict) -> tuple[list[float], list[float], str]:
  """pi_ref's Best-of-N: (KL bound log N - (N-1)/N, reward of Best-of-N) for each N, N = 1 first."""
  ns = sorted(int(n) for n in summary['reward_bon'])
  xs = [0.0] + [math.log(n) - (n - 1) / n for n in ns]
  ys = [summary['reward_ref']] + [summary['reward_bon'][str(n)] for n in ns]
  return xs, ys, 'Best-of-N of pi_ref (N = 1, ' + ', '.join(map(str, ns)) + ')'


def _group(run: str, by_first_field: bool) -> str:
  """A sweep member `eta_0.01-gamma_0.5` belongs to the panel of `eta_0.01`."""
  return run.split('-', 1)[0] if by_first_field and '-' in run else ''


def plot_workdirs(
  workdirs: Sequence[str | pathlib.Path],
  out_dir: str | pathlib.Path,
  smooth: int = 10,
  group_by_first_field: bool = False,
) -> list[pathlib.Path]:
  """One PNG per plot of WORKDIR_PLOTS over the runs (a plot no run has data for is skipped);
  the trade-off plot adds each finished run's final (KL, reward) point and the Best-of-N
  curve of pi_ref from the first summary.json found. With `group_by_first_field`, runs of a
  sweep (named `field_value-field_value`) get one panel per value of the first field."""
  if not workdirs:
    raise FileNotFoundError('no workdirs to plot')
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  curves, summaries = {}, {}
  for workdir in workdirs:
    workdir = pathlib.Path(workdir)
    if not (workdir / 'metrics.jsonl').is_file():
      raise FileNotFoundError(f'{workdir / "metrics.jsonl"} not found: is it a bond_jax workdir?')
    curves[workdir.name] = read_metrics(workdir, smooth)
    if (workdir / 'summary.json').is_file():
      summaries[workdir.name] = json.loads((workdir / 'summary.json').read_text())
  written = []
  for name, (x, y, title) in WORKDIR_PLOTS.items():
    rows: dict[str, dict[str, Curve]] = {}
    for run, curve in curves.items():
      pair = _pair(curve, x, y)
      if pair is not None:
        rows.setdefault(_group(run, group_by_first_field), {})[run] = {x: pair[0], y: pair[1]}
    if not rows:
      continue
    reference = None
    if name == 'tradeoff' and summaries:
      reference = {f'{x}:{y}': bon_reference(next(iter(summaries.values())))}
      for run, s in summaries.items():  # the held-out evaluation's final point
        final = {x: [s['kl_policy_ref']], y: [s['reward_policy']]}
        rows.setdefault(_group(run, group_by_first_field), {})[f'{run} (final eval)'] = final
    path = out_dir / f'{name}.png'
    written.append(plot_panels(path, title, dict(sorted(rows.items())), [(x, y)], reference))
  return written
