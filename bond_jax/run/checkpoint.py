"""Orbax checkpoints of the whole TrainState: policy, anchor, reference, optimizer, step, RNG.

The loop's JSON metadata (the prompt stream's position, the skipped-step counters) rides
along as the checkpoint's custom metadata, so state and position are saved together.

Integrity. Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-save leaves no listed step. That does not cover a step damaged later (a
truncated copy, a disk error), which Orbax may even load without complaint. So after each
save the step's files are listed with their sizes and CRC32s in `MANIFEST` inside the step
directory, and a restore checks them, loads the state, and checks that it is finite; a step
that fails is skipped (the caller warns) and the next older one is tried. Training moves
skipped steps aside (to `<checkpoints>.skipped/`) so that its next saves do not collide
with them; evaluation only reads. Checking costs one read of the step's files.

Retention. Orbax keeps every step (`PreserveAll`); this class deletes the oldest itself,
only after a new step is saved and its manifest written, so `keep` never removes the last
good checkpoint, and a save that fails (a full disk) deletes nothing.

Preemption. Besides every `every` steps, a step is saved when JAX's preemption service
(multi-host runs under `jax.distributed`) reaches its sync point: Orbax's
`PreemptionCheckpointingPolicy` decides, the same step on every host; `preempted` tells
the loop to stop there.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp

MANIFEST = 'bond_jax_manifest.json'
_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or no listed checkpoint is usable."""


@dataclasses.dataclass(frozen=True)
class Restored:
  state: Any
  metadata: dict[str, Any]  # what `save` stored: 'data_position', the loop's counters
  step: int
  skipped: list[tuple[int, str]]  # newer steps that failed their checks, and why


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of `tree` is free of NaN and Inf."""
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  leaves = [jnp.all(jnp.isfinite(x)) for x in floats]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _crc32(path: pathlib.Path) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob('*') if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: pathlib.Path) -> None:
  """Sizes and CRC32s of every file of a saved step, written atomically beside them."""
  files = _files(step_dir)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # zlib releases the GIL
    crcs = list(pool.map(_crc32, files))
  manifest = {
    str(p.relative_to(step_dir)): {'bytes': p.stat().st_size, 'crc32': crc}
    for p, crc in zip(files, crcs, strict=True)
  }
  tmp = step_dir / f'{MANIFEST}.tmp'
  tmp.write_text(json.dumps(manifest, indent=0))
  os.replace(tmp, step_dir / MANIFEST)


def check_manifest(step_dir: pathlib.Path) -> str | None:
  """Why the step's files do not match its manifest, or None when they do (or it has none:
  a step saved before manifests, or cut off between Orbax's commit and the manifest)."""
  path = step_dir / MANIFEST
  if not path.is_file():
    return None
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return f'its {MANIFEST} is unreadable ({type(e).__name__})'
  for name, want in sorted(manifest.items()):
    p = step_dir / name
    if not p.is_file():
      return f'{name} is missing'
    size = p.stat().st_size
    if size != want['bytes']:
      return f'{name} is {size} bytes, {want["bytes"]} were written (truncated or overwritten)'
  for name, want in sorted(manifest.items()):  # sizes first: cheap, and the common damage
    if _crc32(step_dir / name) != want['crc32']:
      return f'{name} fails its CRC32 check (corrupted)'
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200]}' if text else type(e).__name__


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpoints:
  """Saves every `every` steps (and when forced or preempted), keeps the latest `keep`."""

  def __init__(
    self, directory: str | pathlib.Path, every: int, keep: int, *, read_only: bool = False
  ):
    """`read_only` (evaluation) leaves the directory as it is, even a running save's files."""
    self.directory = pathlib.Path(directory).absolute()
    self._keep = keep
    policies = ocp.training.save_decision_policies
    self._ckpt = ocp.training.Checkpointer(
      self.directory,
      save_decision_policy=policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
      ),
      preservation_policy=ocp.training.preservation_policies.PreserveAll(),  # see `_prune`
      cleanup_tmp_directories=not read_only,  # what an interrupted save left behind
    )

  @property
  def steps(self) -> list[int]:
    return [int(c.step) for c in self._ckpt.checkpoints]

  @property
  def latest_step(self) -> int | None:
    steps = self.steps
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> pathlib.Path:
    return pathlib.Path(self._ckpt.directory) / str(step)

  def preempted(self, step: int) -> bool:
    """Whether JAX's preemption service asks every host to save `step` and stop."""
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption service is off
      return False

  def load(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, metadata) of `step`, checked; CheckpointError says why it is unusable."""
    problem = check_manifest(self.step_dir(step))
    if problem:
      raise CheckpointError(problem)
    try:
      custom = self._ckpt.metadata(step).custom_metadata or {}
      state = self._ckpt.load(step, abstract_state)
    except Exception as e:  # noqa: BLE001 (any failure to read means: not usable)
      raise CheckpointError(f'it does not load ({_first_line(e)})') from e
    if 'data_position' not in custom:
      raise CheckpointError('its metadata has no data position')
    if not bool(all_finite(state)):
      raise CheckpointError('it holds NaN or Inf values')
    return state, custom

  def restore_latest(self, abstract_state: Any, *, move_aside: bool = False) -> Restored | None:
    """The newest usable checkpoint, loaded into `abstract_state`'s structure, dtypes and
    shardings; None when there is none. Newer steps that fail their checks are skipped
    (listed in `Restored.skipped`) and, with `move_aside`, moved out of the directory.
    When steps exist but none is usable, raises CheckpointError."""
    skipped: list[tuple[int, str]] = []
    for step in reversed(self.steps):
      try:
        state, custom = self.load(step, abstract_state)
      except CheckpointError as e:
        skipped.append((step, str(e)))
        continue
      if move_aside and skipped:
        self._move_aside([s for s, _ in skipped])
      return Restored(state, custom, step, skipped)
    if skipped:
      why = '; '.join(f'step {s}: {reason}' for s, reason in skipped)
      raise CheckpointError(
        f'no usable checkpoint in {self.directory} ({why}); move the directory away to start over'
      )
    return None

  def _move_aside(self, steps: list[int]) -> None:
    aside = self.directory.with_name(self.directory.name + '.skipped')
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        os.replace(self.step_dir(step), aside / f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
    _sync('bond_jax_checkpoints_moved_aside')
    self._ckpt.reload()

  def save(
    self, step: int, state: Any, *, force: bool = False, metadata: dict[str, Any] | None = None
  ) -> bool:
    """Save if the policy says so (or `force`), with `metadata` (JSON) in the same step.

    Refuses a state with NaN or Inf values. Raises CheckpointError when writing fails;
    the checkpoints already on disk are then untouched."""
    if force and self.latest_step == step:
      return False  # already on disk
    if not force and not self._ckpt.should_save(step):
      return False
    if not bool(all_finite(state)):
      raise CheckpointError(f'refusing to save step {step}: the state holds NaN or Inf values')
    previous = self.latest_step
    try:
      self._ckpt.save(step, state, force=True, custom_metadata=metadata or {})
      if jax.process_index() == 0:
        write_manifest(self.step_dir(step))
      _sync('bond_jax_manifest_written')
    except Exception as e:  # noqa: BLE001 (a full disk, a lost mount: say so in one line)
      kept = f'step {previous} is intact' if previous is not None else 'no earlier checkpoint'
      raise CheckpointError(
        f'saving step {step} to {self.directory} failed ({_first_line(e)}); {kept}'
      ) from e
    self._prune()
    return True

  def _prune(self) -> None:
    """Delete all but the newest `keep` steps (the newest was just saved and checked)."""
    for step in self.steps[: -self._keep]:
      self._ckpt.delete(step)

  def close(self) -> None:
    self._ckpt.close()


def with_sharding(abstract_state: Any, sharding: Any) -> Any:
  """Attach a sharding (one for all leaves, or a matching pytree) to an abstract state."""
  if not isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, sharding
    )
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state
  )
