"""The loop end to end on a micro version of the tiny config: metrics, summary, and resume.

The runs happen in a background process (`micro_runs`, tests/eight_devices.py) while the
rest of the suite runs; these tests read their workdirs. The uninterrupted one-device run
is also what test_multidevice.py compares its sharded runs with.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import torch
import transformers

from bond_jax.models import decoder as model_lib
from bond_jax.run import config as config_lib
from bond_jax.run import evaluation
from bond_jax.run import loop as trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
MICRO_STEPS = 4  # steps of the shared micro run


def micro_config(num_steps: int, lora: bool = False):
  """configs/jbond_tiny.py (or jbond_tiny_lora.py: LoRA adapters on every projection) for
  `num_steps` steps of a small batch."""
  c = config_lib.load_config_file(ROOT / 'configs' / f'jbond_tiny{"_lora" if lora else ""}.py')
  c.reference.sft_steps = 20
  c.reference.sft_batch_size = 16
  c.train.num_steps = num_steps
  c.train.batch_size = 8
  c.ckpt.every = 2
  c.ckpt.keep = 5
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 1
  c.eval.num_prompts = 8
  c.eval.samples_per_prompt = 4
  c.eval.bon_ns = (2, 4)
  c.eval.policy_samples_per_prompt = 2
  c.eval.kl_n = 4
  c.eval.every = 0  # tests/run/test_sweep.py covers the evaluation during training
  c.log.tensorboard = False
  c.log.progress = False
  return c


def _final_state(workdir):
  return trainer.load_workdir(workdir)[2]


class _Crash(Exception):
  pass


def _crash(*args, **kwargs):
  raise _Crash


def crash_then_resume(
  workdir: pathlib.Path, lora: bool = False, mesh: tuple[int, int, int] | None = None
) -> dict:
  """micro_config(2) "crashing" after its last checkpoint (in its evaluation), then the same
  command with MICRO_STEPS steps, on the config's mesh or `mesh` (data, fsdp, model).
  Returns the second run's summary."""

  def config(num_steps):
    c = micro_config(num_steps, lora)
    if mesh is not None:
      c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh
    return c

  evaluate_state = trainer.evaluate_state
  trainer.evaluate_state = _crash
  try:
    trainer.run(config(2), workdir)
  except _Crash:
    pass
  else:
    raise AssertionError('the first run did not reach its evaluation')
  finally:
    trainer.evaluate_state = evaluate_state
  assert not (workdir / 'summary.json').exists()
  return trainer.run(config(MICRO_STEPS), workdir)


def test_resume_continues_at_the_right_step_with_the_same_anchor(micro_runs):
  straight = pathlib.Path(micro_runs['one']['workdir'])
  split = pathlib.Path(micro_runs['resumed']['workdir'])
  a, b = _final_state(straight), _final_state(split)
  assert int(a.step) == int(b.step) == MICRO_STEPS
  for field in ('params', 'anchor_params', 'ref_params', 'opt_state', 'rng'):
    jax.tree.map(
      lambda x, y, f=field: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f),
      getattr(a, field),
      getattr(b, field),
    )
  # The anchor really moved (EMA), so equality above is not trivial.
  assert any(
    not np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a.anchor_params), jax.tree.leaves(a.ref_params), strict=True)
  )

  for k in ('reward_ref', 'reward_policy', 'kl_policy_ref'):  # and evaluates the same
    np.testing.assert_allclose(
      micro_runs['resumed']['summary'][k], micro_runs['one']['summary'][k], rtol=1e-5, atol=1e-6
    )

  rows = [json.loads(line) for line in (split / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  straight_rows = [
    json.loads(line) for line in (straight / 'metrics.jsonl').read_text().splitlines()
  ]
  for k in ('reward_policy', 'kl_ref', 'loss'):  # same prompts, same samples after resuming
    np.testing.assert_allclose(rows[2][k], straight_rows[2][k], rtol=1e-4, atol=1e-5)
  for k in (
    'reward_policy',
    'reward_anchor',
    'kl_ref',
    'kl_anchor',
    'frac_penalized',
    'loss_fwd',
    'loss_bwd',
    'loss_reg',
    'grad_norm',
    'learning_rate',
    'tokens_per_s',
  ):
    assert k in rows[0], k


def test_trained_policy_exports_with_the_same_logits(micro_runs, tmp_path):
  """The trained policy exports as a Hugging Face checkpoint with the same logits."""
  straight = pathlib.Path(micro_runs['one']['workdir'])
  exported = trainer.export_policy(straight, tmp_path / 'hf_policy')
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  c, setup, state = trainer.load_workdir(straight)
  tokens = np.array(setup.eval_prompts[0][:4])
  ours = model_lib.forward(setup.cfg, state.params, tokens, np.ones_like(tokens, bool))
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_summary_is_on_disk_and_read_back_from_the_workdir(micro_runs, tmp_path):
  straight, summary = pathlib.Path(micro_runs['one']['workdir']), micro_runs['one']['summary']
  on_disk = json.loads((straight / 'summary.json').read_text())
  assert on_disk == json.loads(json.dumps(summary))
  # Reading the run back from its workdir (config.json + latest checkpoint) gives the same
  # table (on a copy: evaluating writes summary.json, and the shared run stays as it is).
  again = evaluation.evaluate_workdir(shutil.copytree(straight, tmp_path / 'copy'))[0]
  for k in ('reward_ref', 'reward_policy', 'kl_policy_ref'):
    np.testing.assert_allclose(again[k], summary[k], rtol=1e-5, atol=1e-6)
  assert set(on_disk['reward_bon']) == {'2', '4'}
  assert on_disk['reward_bon']['4'] >= on_disk['reward_bon']['2'] >= 0.0
