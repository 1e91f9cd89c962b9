"""Metrics: every step to `metrics.jsonl` (the source for plots), TensorBoard and a
progress bar with ETA.

The logs follow the state: a writer that starts at step s (a resumed run) first cuts
`metrics.jsonl` back to steps <= s and tells TensorBoard to purge later events, so a
step that was logged, lost in a crash and trained again appears once. Non-finite values
(a skipped step: see `step.nonfinite_flags`) are written as null and left out of
TensorBoard; stopping on them is the loop's decision (`train.max_bad_steps`).

On several processes only process 0 writes (the metrics are the same on every process:
they are computed from global arrays); the others' writers do nothing.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax
import tqdm

# Shown in the progress bar (the rest goes to the files).
_BAR_KEYS = ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss')


def cut_jsonl(path: pathlib.Path, last_step: int) -> None:
  """Keep the rows of `path` up to `last_step` (and drop a torn last line), atomically."""
  if not path.is_file():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut short by a crash
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] <= last_step:
      kept.append(line + '\n')
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(''.join(kept))
  os.replace(tmp, path)


def _finite_or_none(v: float) -> float | None:
  return v if math.isfinite(v) else None


class MetricWriter:
  def __init__(
    self,
    workdir: str | pathlib.Path,
    total_steps: int,
    initial_step: int = 0,
    tensorboard: bool = True,
    progress: bool = True,
  ):
    self._jsonl = self._tb = self._bar = None
    if jax.process_index() != 0:
      return
    workdir = pathlib.Path(workdir)
    cut_jsonl(workdir / 'metrics.jsonl', initial_step)
    self._jsonl = open(workdir / 'metrics.jsonl', 'a')  # noqa: SIM115 (closed in close())
    if tensorboard:
      # tensorboardX imports torch (seconds): only when TensorBoard is on.
      from tensorboardX import SummaryWriter

      # TensorBoard drops the events of steps > initial_step that an interrupted run wrote.
      # The suffix keeps two writers started within a second in two files.
      self._tb = SummaryWriter(
        str(workdir / 'tensorboard'),
        purge_step=initial_step + 1,
        filename_suffix=f'.from_step_{initial_step}',
      )
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=initial_step,
      disable=not progress,
      dynamic_ncols=True,
      desc='train',
    )

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if self._jsonl is None:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    row = {k: _finite_or_none(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': step, **row}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if v is not None:
          self._tb.add_scalar(k, v, step)
    self._bar.set_postfix(
      {k: f'{row[k]:.3f}' for k in _BAR_KEYS if row.get(k) is not None}, refresh=False
    )
    self._bar.update(1)

  def close(self) -> None:
    for part in (self._bar, self._jsonl, self._tb):
      if part is not None:
        part.close()
