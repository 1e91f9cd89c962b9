"""Lean and asynchronous checkpoints (run/checkpoint.py, guards.reference_reloader).

- An asynchronous save returns before Orbax commits the step; the state it was given can be
  donated at once; the manifest appears only once the step is committed; a save that fails
  in the background is reported at the next save and the previous step stays the restored
  one; a process killed mid-save leaves no listed step.
- A fixed anchor or REINFORCE writes no anchor tree.
- A Hugging Face run's pi_ref is not written: the checkpoint records the SHA-256 of its
  files, a restore reloads it from them, and a changed file stops the restore with one line
  naming model.hf_checkpoint (Checkpoints and guards alone, then through the loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from bond_jax.algo import state as state_lib
from bond_jax.models import hf
from bond_jax.run import checkpoint, guards
from bond_jax.run import config as config_lib
from bond_jax.run import loop as trainer
from bond_jax.types import ConfigError
from tests import hf_fixtures
from tests.run.test_e2e_hf import _config as e2e_config
from tests.run.test_loop import micro_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
META = {'data_position': {'index': 0}}


def _abstract(tree):
  return checkpoint.with_sharding(jax.eval_shape(lambda: tree), ONE_DEVICE)


def _on_disk(ckpts: checkpoint.Checkpoints, step: int) -> set[str]:
  """Top-level names of the arrays stored in `step` (from Orbax's tree metadata)."""
  tree = ckpts._ckpt.metadata(step).metadata
  return {
    str(getattr(path[0], 'name', getattr(path[0], 'key', path[0])))
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _bytes(step_dir: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in step_dir.rglob('*') if p.is_file())


@pytest.fixture
def held_commit(monkeypatch):
  """Orbax's commit (the rename of a step's temporary directory) waits until `.set()`."""
  release = threading.Event()
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held(self):
    await asyncio.to_thread(release.wait, 60)
    await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', held)
  return release


def test_an_async_save_returns_before_the_commit_and_the_manifest_follows_it(tmp_path, held_commit):
  ckpts = checkpoint.Checkpoints(tmp_path, 1, keep=1, asynchronous=True)
  step = jax.jit(lambda s: {'w': s['w'] + 1.0}, donate_argnums=0)
  state = step({'w': jnp.arange(1000.0)})
  assert ckpts.save(1, state, metadata=META)
  state = step(state)  # the saved arrays are donated (deleted) while the save runs
  assert ckpts.saving == 1
  assert not ckpts.step_dir(1).exists()  # not committed: nothing listed on disk
  assert not list(tmp_path.rglob(checkpoint.MANIFEST))
  held_commit.set()
  ckpts.wait()
  assert ckpts.saving is None and (ckpts.step_dir(1) / checkpoint.MANIFEST).is_file()
  assert checkpoint.check_manifest(ckpts.step_dir(1)) is None
  assert ckpts.save(2, state, metadata=META)
  ckpts.close()  # waits; keep=1 deleted step 1 only after step 2 was whole
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['2']
  again = checkpoint.Checkpoints(tmp_path, 1, keep=1, read_only=True)
  restored = again.restore_latest(_abstract({'w': jnp.zeros(1000)}))
  again.close()
  assert restored.step == 2
  np.testing.assert_array_equal(restored.state['w'], np.arange(1000.0) + 2)


def test_a_failed_async_save_is_reported_at_the_next_save_and_keeps_the_previous(
  tmp_path, monkeypatch
):
  ckpts = checkpoint.Checkpoints(tmp_path, 1, keep=1, asynchronous=True)
  ckpts.save(1, {'w': jnp.arange(3.0)}, metadata=META)
  ckpts.wait()

  async def disk_full(self):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full)
  assert ckpts.save(2, {'w': jnp.arange(3.0) + 2}, metadata=META)  # fails in the background
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'^saving step 2 to .* failed \(OSError: \[Errno 28\] No space left on device\); '
    r'step 1 is intact$',
  ):
    ckpts.save(3, {'w': jnp.arange(3.0) + 3}, metadata=META)
  monkeypatch.undo()
  try:
    ckpts.close()
  except Exception:  # noqa: BLE001, S110 (Orbax may repeat the stored failure on close)
    pass
  again = checkpoint.Checkpoints(tmp_path, 1, keep=1)
  restored = again.restore_latest(_abstract({'w': jnp.zeros(3)}))
  assert again.steps == [1] and restored.state['w'].tolist() == [0.0, 1.0, 2.0]
  again.close()


_KILLED_MID_SAVE = """
import asyncio, os, pathlib, signal, sys, time
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from bond_jax.run import checkpoint

directory = pathlib.Path(sys.argv[1])
ckpts = checkpoint.Checkpoints(directory, 1, keep=2, asynchronous=True)
ckpts.save(1, {'w': jnp.arange(4096.0)}, metadata={'data_position': {'index': 1}})
ckpts.wait()

async def never(self):
  await asyncio.sleep(3600)

atomicity.AtomicRenameTemporaryPath.finalize = never  # the commit of step 2 never comes
ckpts.save(2, {'w': jnp.arange(4096.0) + 2}, metadata={'data_position': {'index': 2}})
deadline = time.time() + 60
while time.time() < deadline:  # until step 2's data is on disk, in its temporary directory
  if any(p.is_file() and p.parent.name == 'd' for p in directory.rglob('*tmp*/**/*')):
    break
  time.sleep(0.01)
print(sorted(p.name for p in directory.iterdir()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_mid_save_leaves_no_usable_half_checkpoint(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  proc = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(_KILLED_MID_SAVE), str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  listed = proc.stdout.strip()
  assert "'1'" in listed and 'tmp' in listed and "'2'" not in listed, listed  # killed mid-save
  # Evaluation (read-only) sees step 1 only and leaves the directory as it is ...
  read_only = checkpoint.Checkpoints(tmp_path, 1, keep=2, read_only=True)
  abstract = _abstract({'w': jnp.zeros(4096)})
  restored = read_only.restore_latest(abstract)
  read_only.close()
  assert read_only.steps == [1] and restored.step == 1 and restored.state['w'][1] == 1.0
  assert any('tmp' in p.name for p in tmp_path.iterdir())
  # ... and training restores step 1 and clears the half-written step away.
  training = checkpoint.Checkpoints(tmp_path, 1, keep=2, asynchronous=True)
  restored = training.restore_latest(abstract, move_aside=True)
  assert restored.step == 1 and restored.skipped == []
  training.save(2, {'w': jnp.arange(4096.0) + 2}, metadata=META)
  training.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']


def test_a_fixed_anchor_or_reinforce_writes_no_anchor_tree(tmp_path, tiny_params):
  tx, _ = state_lib.make_optimizer(1e-3, 0)
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(tiny_params))
  sizes = {}
  for algorithm, anchor, copy in (
    ('jbond', 'ema', True),
    ('jbond', 'fixed', False),
    ('reinforce', 'ema', False),
  ):
    c = micro_config(2)
    c.bond.algorithm, c.bond.anchor = algorithm, anchor
    state = state_lib.init_state(
      config_lib.bond_config(c), tiny_params, tiny_params, tx, jax.random.PRNGKey(0)
    )
    assert (state.anchor_params is not None) == copy
    directory = tmp_path / f'{algorithm}_{anchor}'
    ckpts = checkpoint.Checkpoints(directory, 1, keep=1, asynchronous=True)
    ckpts.save(1, state, metadata=META)
    ckpts.wait()
    stored = _on_disk(ckpts, 1)
    ckpts.close()
    assert ('anchor_params' in stored) == copy, (algorithm, anchor, stored)
    assert {'params', 'ref_params', 'opt_state'} <= stored
    sizes[algorithm, anchor] = _bytes(directory / '1')
  # On disk, the anchor copy is one more copy of the parameters, and nothing else differs
  # (Adam's zero moments compress to almost nothing, so compare with the moving anchor).
  extra = sizes['jbond', 'ema'] - sizes['jbond', 'fixed']
  assert 0.8 * params_bytes < extra < 1.2 * params_bytes, (sizes, params_bytes)
  assert abs(sizes['reinforce', 'ema'] - sizes['jbond', 'fixed']) < 0.05 * params_bytes, sizes


def _hf_run(hf_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """What guards.reference_reloader reads of a Hugging Face run's config."""
  return ml_collections.ConfigDict(
    {'task': {'name': 'hf'}, 'model': {'hf_checkpoint': str(hf_dir)}}
  )


def _reloading_setup(hf_dir: pathlib.Path, calls: list) -> types.SimpleNamespace:
  """The part of a RunSetup the reloader uses: `reference(shardings)` loads pi_ref."""

  def reference(shardings):
    calls.append(shardings)
    return hf.load_params(hf_dir, shardings=shardings)[1]

  return types.SimpleNamespace(reference=reference)


def test_a_hugging_face_reference_is_reloaded_and_checked_not_saved(
  tmp_path, tiny_cfg, tiny_params
):
  hf_dir = hf.export_hf(tiny_cfg, tiny_params, tmp_path / 'policy')
  c = _hf_run(hf_dir)
  record = guards.reference_record(c)
  assert set(record['files']) == {'config.json', 'model.safetensors'}
  ref = hf.load_params(hf_dir)[1]
  bond = config_lib.bond_config(micro_config(2))
  tx, _ = state_lib.make_optimizer(1e-3, 0)
  state = state_lib.init_state(bond, ref, ref, tx, jax.random.PRNGKey(0))
  meta = {**META, guards.REFERENCE: record}

  lean, full = tmp_path / 'lean', tmp_path / 'full'
  for directory, leave_out in ((lean, ('ref_params',)), (full, ())):
    ckpts = checkpoint.Checkpoints(directory, 1, keep=2, asynchronous=True)
    for step in (1, 2):
      ckpts.save(step, state.replace(step=jnp.int32(step)), metadata=meta, leave_out=leave_out)
    ckpts.wait()
    stored = _on_disk(ckpts, 2)
    ckpts.close()
    assert ('ref_params' in stored) == (directory == full), stored
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(ref))
  assert _bytes(full / '2') - _bytes(lean / '2') > 0.9 * params_bytes

  abstract = checkpoint.with_sharding(jax.eval_shape(lambda: state), ONE_DEVICE)
  with pytest.raises(ValueError, match=r"leaves out \['ref_params'\].*reload="):
    checkpoint.Checkpoints(lean, 1, keep=2, read_only=True).load(2, abstract)
  calls = []
  ckpts = checkpoint.Checkpoints(
    lean,
    1,
    keep=2,
    read_only=True,
    reload=guards.reference_reloader(c, _reloading_setup(hf_dir, calls)),
  )
  restored = [ckpts.load(step, abstract)[0] for step in (1, 2)]
  ckpts.close()
  assert len(calls) == 1  # loaded once for both steps
  assert [int(s.step) for s in restored] == [1, 2]
  for s in restored:
    jax.tree.map(np.testing.assert_array_equal, s.ref_params, ref)
    jax.tree.map(np.testing.assert_array_equal, s.params, state.params)

  # A changed weight file (same size: only the checksum can tell) stops the restore.
  weights = hf_dir / 'model.safetensors'
  raw = bytearray(weights.read_bytes())
  raw[-5] ^= 0xFF
  weights.write_bytes(bytes(raw))
  ckpts = checkpoint.Checkpoints(
    lean,
    1,
    keep=2,
    read_only=True,
    reload=guards.reference_reloader(c, _reloading_setup(hf_dir, [])),
  )
  with pytest.raises(
    ConfigError,
    match=rf"^config\.model\.hf_checkpoint='{hf_dir}' changed since the checkpoint was saved "
    r'\(model\.safetensors differs; sha256 [0-9a-f]{12}\.\.\., recorded [0-9a-f]{12}\.\.\.\): '
    r'pi_ref is reloaded from it on resume; restore the files the run started from, or use '
    r'a new --workdir\.$',
  ):
    ckpts.restore_latest(abstract)  # not skipped as a damaged checkpoint: every step needs it
  ckpts.close()


def test_dataclass_states_keep_their_type_through_leave_out(tmp_path):
  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class S:
    a: jax.Array
    b: jax.Array | None

  ckpts = checkpoint.Checkpoints(
    tmp_path, 1, keep=1, reload=lambda field, meta, abstract: jnp.full(abstract.shape, 7.0)
  )
  ckpts.save(1, S(jnp.ones(3), jnp.zeros(2)), metadata=META, leave_out=('b',))
  state, meta = ckpts.load(1, _abstract(S(jnp.ones(3), jnp.zeros(2))))
  ckpts.close()
  assert isinstance(state, S) and meta[checkpoint.LEFT_OUT] == ['b']
  assert state.a.tolist() == [1.0] * 3 and state.b.tolist() == [7.0, 7.0]


def test_a_hugging_face_run_resumes_with_pi_ref_reloaded_from_its_files(
  tmp_path, monkeypatch, capsys
):
  """Through the loop: a checkpoint without pi_ref, a resume that reloads it, and one that
  stops because its files changed. The resume has no step left to train and the final
  evaluation is left out (one compiled step in all)."""
  tok = hf_fixtures.make_tokenizer_dir(tmp_path / 'tokenizer')
  artefacts = {
    'policy': str(hf_fixtures.make_policy_dir(tmp_path / 'policy', tok)),
    'reward': str(hf_fixtures.make_reward_dir(tmp_path / 'reward', tok)),
    'jsonl': str(hf_fixtures.write_jsonl(tmp_path / 'prompts.jsonl', ['a b', 'c d', 'e f'])),
  }
  monkeypatch.setattr(trainer, 'evaluate_state', lambda c, setup, state, workdir: {})
  c = e2e_config(artefacts, 'jsonl')
  c.train.num_steps = 1
  workdir = tmp_path / 'run'

  trainer.run(c, workdir)
  trainer.run(c, workdir)
  out = capsys.readouterr().out
  assert f'resumed from {workdir / "checkpoints"} at step 1' in out
  assert out.count(f'loading pi_ref from {artefacts["policy"]}') == 2  # trained, then resumed
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', 1, 2, read_only=True)
  assert ckpts.steps == [1]
  record = ckpts._ckpt.metadata(1).custom_metadata[guards.REFERENCE]
  stored = _on_disk(ckpts, 1)
  ckpts.close()
  assert record == guards.reference_record(c)
  assert 'ref_params' not in stored and {'params', 'anchor_params', 'opt_state'} <= stored

  weights = pathlib.Path(artefacts['policy']) / 'model.safetensors'
  raw = bytearray(weights.read_bytes())
  raw[-5] ^= 0xFF
  weights.write_bytes(bytes(raw))
  with pytest.raises(ConfigError, match=r'^config\.model\.hf_checkpoint=.* changed since'):
    trainer.run(c, workdir)


def test_a_config_from_before_the_memory_knobs_resumes_under_their_defaults():
  now = micro_config(4).to_dict()
  before = {k: {f: v for f, v in sec.items() if f'{k}.{f}' not in config_lib.MEMORY_DEFAULTS}
            if isinstance(sec, dict) else sec for k, sec in now.items()}  # fmt: skip
  assert before != now  # the micro config has the knobs
  # All at their defaults but one: the tiny config reads prompts once in the update, a
  # change a resumed run may make (the same update).
  assert guards.config_changes(before, now) == ({'train.share_prompts': (False, True)}, {})
  now['train']['share_prompts'] = False
  assert guards.config_changes(before, now) == ({}, {})
  now['optim']['mu_dtype'] = 'bfloat16'  # not the default: a change, and not a safe one
  assert guards.config_changes(before, now) == ({}, {'optim.mu_dtype': ('', 'bfloat16')})
