"""LoRA runs of the micro config (tests/eight_devices.py): the (2, 2, 2) mesh gives the
one-device run, a run stopped and resumed is bit-identical to one that was not, the
checkpoints hold adapters (the frozen base once), and an export folds them in."""

import json
import pathlib

import jax
import numpy as np
import pytest
import transformers

from bond_jax.models import hf, lora
from bond_jax.run import loop as trainer
from tests.run.test_loop import MICRO_STEPS


def test_sharded_lora_run_matches_single_device(micro_runs):
  one, other = micro_runs['lora_one'], micro_runs['lora_dp2_fsdp2_tp2']
  assert len(other['rows']) == len(one['rows']) == MICRO_STEPS
  for r1, r2 in zip(one['rows'], other['rows'], strict=True):
    for k in ('reward_policy', 'reward_anchor', 'kl_ref', 'kl_anchor', 'loss', 'grad_norm'):
      np.testing.assert_allclose(r2[k], r1[k], rtol=2e-3, atol=2e-4, err_msg=k)
  for k in ('reward_ref', 'reward_policy', 'kl_policy_ref'):
    np.testing.assert_allclose(other['summary'][k], one['summary'][k], rtol=2e-3, atol=2e-4)
  assert all(r['grad_norm'] > 0 for r in one['rows'])  # the adapters were trained


def test_resumed_lora_run_is_bit_identical(micro_runs):
  straight = trainer.load_workdir(micro_runs['lora_one']['workdir'])[2]
  resumed = trainer.load_workdir(micro_runs['lora_resumed']['workdir'])[2]
  assert int(straight.step) == int(resumed.step) == MICRO_STEPS
  for field in ('params', 'anchor_params', 'ref_params', 'opt_state', 'rng'):
    same = lambda x, y, f=field: np.testing.assert_array_equal(x, y, err_msg=f)
    jax.tree.map(same, getattr(straight, field), getattr(resumed, field))
  rows = lambda name: (pathlib.Path(micro_runs[name]['workdir']) / 'metrics.jsonl').read_text()
  strip = lambda text: [  # everything but the wall-clock times
    {k: v for k, v in json.loads(line).items() if not k.endswith(('_s', 'tokens_per_s'))}
    for line in text.splitlines()
  ]
  assert strip(rows('lora_resumed')) == strip(rows('lora_one'))


def test_lora_checkpoint_holds_adapters_and_exports_folded(micro_runs, tmp_path):
  c, setup, state = trainer.load_workdir(micro_runs['lora_one']['workdir'])
  assert setup.cfg.lora.on and not lora.has_adapters(state.ref_params)
  assert not jax.tree.leaves(lora.split(state.params)[0])  # adapters only
  assert not jax.tree.leaves(lora.split(state.anchor_params)[0])
  full = sum(x.size for x in jax.tree.leaves(state.ref_params))
  trained = sum(x.size for x in jax.tree.leaves(state.params))
  assert trained < full  # the policy is adapters, not a second model
  out = trainer.export_policy(micro_runs['lora_one']['workdir'], tmp_path / 'merged')
  cfg, folded = hf.load_params(out)
  want = lora.fold(setup.cfg.lora, lora.attach(state.ref_params, state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), folded, want)
  assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == cfg.num_layers
  peft_dir = trainer.export_policy(
    micro_runs['lora_one']['workdir'], tmp_path / 'adapters', adapters_only=True
  )
  config = json.loads((peft_dir / 'adapter_config.json').read_text())
  assert (config['r'], config['lora_alpha']) == (setup.cfg.lora.rank, setup.cfg.lora.alpha)
  with pytest.raises(trainer.ConfigError, match='--adapters_only: this run trains the whole'):
    trainer.export_policy(micro_runs['one']['workdir'], tmp_path / 'x', adapters_only=True)
