"""Metrics: every step to `metrics.jsonl` (the source for plots), TensorBoard and a
progress bar with ETA. Non-finite values stop the run at once."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import tqdm
from tensorboardX import SummaryWriter

# Shown in the progress bar (the rest goes to the files).
_BAR_KEYS = ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss')


class NonFiniteError(FloatingPointError):
  pass


class MetricWriter:
  def __init__(
    self,
    workdir: str | pathlib.Path,
    total_steps: int,
    initial_step: int = 0,
    tensorboard: bool = True,
    progress: bool = True,
  ):
    workdir = pathlib.Path(workdir)
    self._jsonl = open(workdir / 'metrics.jsonl', 'a')  # noqa: SIM115 (closed in close())
    self._tb = SummaryWriter(str(workdir / 'tensorboard')) if tensorboard else None
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=initial_step,
      disable=not progress,
      dynamic_ncols=True,
      desc='train',
    )

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    bad = [k for k, v in scalars.items() if not math.isfinite(v)]
    if bad:
      raise NonFiniteError(f'step {step}: non-finite metrics {bad}: {scalars}')
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    self._bar.set_postfix(
      {k: f'{scalars[k]:.3f}' for k in _BAR_KEYS if k in scalars}, refresh=False
    )
    self._bar.update(1)

  def close(self) -> None:
    self._bar.close()
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
