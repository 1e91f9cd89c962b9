"""Orbax checkpoints of the TrainState: policy, anchor, reference, optimizer, step, RNG.

The loop's JSON metadata (the prompt stream's position, the skipped-step counters) rides
along as the checkpoint's custom metadata, so state and position are saved together.

Lean. A field that can be reloaded from elsewhere is left out (`save(leave_out=...)`,
e.g. pi_ref of a Hugging Face run, which is its `model.hf_checkpoint`): the checkpoint's
metadata lists it, `load` restores the rest and asks the `reload` function given to
`Checkpoints` for it (which checks that what it reloads is what was saved against:
`guards.reference_reloader`). Fields that are None (no anchor copy for a fixed anchor
or REINFORCE) are nothing on disk.

Asynchronous saving (`asynchronous=True`, what training uses). `save` returns once the
state is copied off the devices; Orbax writes and commits it in the background while
training goes on, and a background thread then writes the step's manifest (below). The
next `save`, `wait`, `close` (and the loop, before it stops on a signal and before it
returns) wait for that to finish and raise a `CheckpointError` if it failed; only then
are old steps deleted. At most one save is in flight.

Integrity. Orbax writes each step to a temporary directory and renames it when complete
(on several hosts: once every host has written its part), so a crash mid-save leaves no
listed step, and the next start deletes the temporary directory. That does not cover a
step damaged later (a truncated copy, a disk error), which Orbax may even load without
complaint. So once a save is committed its files are listed with their sizes and CRC32s
in `MANIFEST` inside the step directory, and a restore checks them, loads the state, and
checks that it is finite; a step that fails is skipped (the caller warns) and the next
older one is tried. Training moves skipped steps aside (to `<checkpoints>.skipped/`) so
that its next saves do not collide with them; evaluation only reads. Checking costs one
read of the step's files, by process 0 alone on several hosts (it tells the others).

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
import hashlib
import json
import os
import pathlib
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp

MANIFEST = 'bond_jax_manifest.json'
LEFT_OUT = 'bond_jax_left_out'  # metadata: the state's fields this step does not hold
_CHUNK = 1 << 24

# (field, the checkpoint's metadata, the field's abstract value with shardings) -> its value
Reload = Callable[[str, dict[str, Any], Any], Any]


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


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def file_digests(directory: str | pathlib.Path, patterns: Sequence[str]) -> dict[str, str]:
  """SHA-256 of each file of `directory` matching `patterns` (globs), by name, hashed in
  parallel (hashlib releases the GIL); FileNotFoundError when none matches."""
  directory = pathlib.Path(directory)
  files = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
  if not files:
    raise FileNotFoundError(f'no {" or ".join(patterns)} in {directory}')
  with concurrent.futures.ThreadPoolExecutor(min(8, len(files))) as pool:
    digests = list(pool.map(_sha256, files))
  return {str(p.relative_to(directory)): d for p, d in zip(files, digests, strict=True)}


def combined_digest(digests: dict[str, str]) -> str:
  """One SHA-256 of a {name: sha256} listing (names included, order-independent)."""
  lines = ''.join(f'{name}\t{digests[name]}\n' for name in sorted(digests))
  return hashlib.sha256(lines.encode()).hexdigest()


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


def _from_process_0(check: Callable[[], str | None]) -> str | None:
  """`check()` run by process 0 alone, its answer (a short text or None) given to all."""
  if jax.process_count() == 1:
    return check()
  buf = np.zeros(1024, np.uint8)
  if jax.process_index() == 0:
    answer = check()
    if answer is not None:
      raw = answer.encode()[: buf.size - 1]
      buf[0], buf[1 : 1 + len(raw)] = 1, np.frombuffer(raw, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(buf[1:]).rstrip(b'\0').decode(errors='replace') if buf[0] else None


@dataclasses.dataclass
class _Pending:
  step: int
  previous: int | None  # the newest step before it
  done: concurrent.futures.Future  # Orbax's commit, then the manifest


class Checkpoints:
  """Saves every `every` steps (and when forced or preempted), keeps the latest `keep`."""

  def __init__(
    self,
    directory: str | pathlib.Path,
    every: int,
    keep: int,
    *,
    read_only: bool = False,
    asynchronous: bool = False,
    reload: Reload | None = None,
  ):
    """`read_only` (evaluation) leaves the directory as it is, even a running save's files.
    `asynchronous`: `save` returns while the step is written (see the module docstring).
    `reload` gives back the fields a checkpoint left out (`save(leave_out=...)`)."""
    self.directory = pathlib.Path(directory).absolute()
    self._keep = keep
    self._asynchronous = asynchronous
    self.reload = reload
    self._pending: _Pending | None = None
    self._finisher = concurrent.futures.ThreadPoolExecutor(1, 'bond_jax_checkpoint')
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
    """(state, metadata) of `step`, checked, with the fields it left out reloaded;
    CheckpointError says why it is unusable."""
    problem = _from_process_0(lambda: check_manifest(self.step_dir(step)))
    if problem:
      raise CheckpointError(problem)
    try:
      custom = self._ckpt.metadata(step).custom_metadata or {}
      left_out = list(custom.get(LEFT_OUT, []))
      target = (
        dataclasses.replace(abstract_state, **dict.fromkeys(left_out))
        if left_out
        else abstract_state
      )
      state = self._ckpt.load(step, target)
    except Exception as e:  # noqa: BLE001 (any failure to read means: not usable)
      raise CheckpointError(f'it does not load ({_first_line(e)})') from e
    if 'data_position' not in custom:
      raise CheckpointError('its metadata has no data position')
    if not bool(all_finite(state)):
      raise CheckpointError('it holds NaN or Inf values')
    if left_out and self.reload is None:
      raise ValueError(
        f'checkpoint step {step} of {self.directory} leaves out {left_out} (reloadable); open '
        'it with Checkpoints(..., reload=guards.reference_reloader(c, setup)).'
      )
    for field in left_out:  # errors here are the reload's own (a changed source): not skipped
      value = self.reload(field, custom, getattr(abstract_state, field))
      state = dataclasses.replace(state, **{field: value})
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
    self,
    step: int,
    state: Any,
    *,
    force: bool = False,
    metadata: dict[str, Any] | None = None,
    leave_out: Sequence[str] = (),
  ) -> bool:
    """Save if the policy says so (or `force`), with `metadata` (JSON) in the same step,
    without the dataclass fields `leave_out` (listed in the metadata; `load` reloads them).

    Refuses a state with NaN or Inf values. Raises CheckpointError when writing fails
    (asynchronous: when the previous save failed; its own failure surfaces at the next
    `save` or `wait`); the checkpoints already on disk are then untouched."""
    if force and step in self.steps:
      return False  # already on disk, or being written
    if not force and not self._ckpt.should_save(step):
      return False
    if not bool(all_finite(state)):
      raise CheckpointError(f'refusing to save step {step}: the state holds NaN or Inf values')
    self.wait()  # one save at a time; old steps are deleted once the last one is whole
    previous = self.latest_step
    metadata = dict(metadata or {})
    if leave_out:
      state = dataclasses.replace(state, **dict.fromkeys(leave_out))
      metadata[LEFT_OUT] = list(leave_out)
    try:
      if self._asynchronous:
        response = self._ckpt.save_async(step, state, force=True, custom_metadata=metadata)
        done = self._finisher.submit(self._finish, step, response)
      else:
        self._ckpt.save(step, state, force=True, custom_metadata=metadata)
        done = self._finisher.submit(self._finish, step, None)
    except Exception as e:  # noqa: BLE001 (a full disk, a lost mount: say so in one line)
      raise self._failed(step, previous, e) from e
    self._pending = _Pending(step, previous, done)
    if not self._asynchronous:
      self.wait()
    return True

  def _finish(self, step: int, response: Any) -> None:
    """In the background: wait for Orbax's commit of `step`, then write its manifest."""
    if response is not None:
      response.result()
    if jax.process_index() == 0:
      write_manifest(self.step_dir(step))

  def _failed(self, step: int, previous: int | None, e: BaseException) -> CheckpointError:
    kept = f'step {previous} is intact' if previous is not None else 'no earlier checkpoint'
    return CheckpointError(
      f'saving step {step} to {self.directory} failed ({_first_line(e)}); {kept}'
    )

  @property
  def saving(self) -> int | None:
    """The step being written in the background, or None."""
    return self._pending.step if self._pending is not None else None

  def wait(self) -> None:
    """Wait for the save in flight (if any) to be committed with its manifest, then delete
    the steps past `keep`. Raises CheckpointError if that save failed."""
    pending, self._pending = self._pending, None
    if pending is None:
      return
    try:
      pending.done.result()
      _sync('bond_jax_manifest_written')
    except Exception as e:  # noqa: BLE001 (a full disk, a lost mount: say so in one line)
      raise self._failed(pending.step, pending.previous, e) from e
    self._prune()

  def _prune(self) -> None:
    """Delete all but the newest `keep` steps (the newest was just saved and checked)."""
    for step in self.steps[: -self._keep]:
      self._ckpt.delete(step)

  def close(self) -> None:
    """Wait for the save in flight (raising CheckpointError if it failed) and let go."""
    try:
      self.wait()
    finally:
      self._finisher.shutdown()
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
