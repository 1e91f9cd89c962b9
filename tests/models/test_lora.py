"""LoRA adapters on the decoder: fresh adapters compute the base exactly; folded adapters
compute what unfolded ones do; a merged export loads in transformers, and an adapters-only
export in peft, with the unmerged model's logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import hf, lora, presets, sampling, sharding
from bond_jax.types import ConfigError

ALL = tuple(lora.TARGETS)


def _cfg(scan: bool = False, rank: int = 4, targets=ALL, **kw) -> model_lib.ModelConfig:
  base = dataclasses.replace(presets.PRESETS['tiny'], scan_layers=scan, **kw)
  return dataclasses.replace(base, lora=lora.LoraConfig(rank, 2.0 * rank, targets))


def _tokens():
  vocab = presets.PRESETS['tiny'].vocab_size
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (3, 9)), jnp.int32)
  valid = jnp.ones(tokens.shape, bool).at[1, :3].set(False)  # a left-padded row
  return tokens, valid


def _random_adapters(adapters, seed=1):
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), adapters)


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_fresh_adapters_compute_the_base_exactly(scan):
  cfg = _cfg(scan, remat='block')
  base = model_lib.init_params(model_lib.base_config(cfg), jax.random.key(0))
  adapters = model_lib.init_adapters(cfg, jax.random.key(1))
  # The same tree as the module's own init, b zero, a drawn (every leaf of a nonzero).
  _, own = lora.split(model_lib.init_params(cfg, jax.random.key(0)))
  assert jax.tree.structure(own) == jax.tree.structure(adapters)
  assert [x.shape for x in jax.tree.leaves(own)] == [x.shape for x in jax.tree.leaves(adapters)]
  for name, x in jax.tree_util.tree_leaves_with_path(adapters):
    is_b = sharding.path_name(name).endswith('/b')
    assert bool(jnp.all(x == 0)) == is_b, name
  tokens, valid = _tokens()
  want = model_lib.forward(model_lib.base_config(cfg), base, tokens, valid)
  assert bool(jnp.all(jnp.isfinite(want)))
  policy = lora.attach(base, adapters)
  np.testing.assert_array_equal(model_lib.forward(cfg, policy, tokens, valid), want)
  # Without adapters in the tree, a LoRA config computes the base (pi_ref): no zeros needed.
  np.testing.assert_array_equal(model_lib.forward(cfg, base, tokens, valid), want)
  assert lora.split(policy)[0].keys() == base.keys()


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_folded_adapters_compute_the_same_model(scan):
  cfg = _cfg(scan)
  base = model_lib.init_params(model_lib.base_config(cfg), jax.random.key(0))
  adapters = _random_adapters(model_lib.init_adapters(cfg, jax.random.key(1)))
  policy = lora.attach(base, adapters)
  tokens, valid = _tokens()
  unfolded = model_lib.forward(cfg, policy, tokens, valid)
  folded = lora.fold(cfg.lora, policy)
  assert not lora.has_adapters(folded)
  np.testing.assert_allclose(
    model_lib.forward(model_lib.base_config(cfg), folded, tokens, valid),
    unfolded,
    rtol=1e-4,
    atol=1e-5,
  )
  assert float(jnp.abs(unfolded - model_lib.forward(cfg, base, tokens, valid)).max()) > 0.1
  # Each folded kernel is W + a . b * alpha / r, by hand for one projection.
  layer = (
    (lambda t: jax.tree.map(lambda x: x[0], t['layers'])) if scan else (lambda t: t['layer_0'])
  )  # noqa: E501
  w, ad = layer(base)['mlp']['up_proj']['kernel'], layer(adapters)['mlp']['up_proj_lora']
  np.testing.assert_allclose(
    layer(folded)['mlp']['up_proj']['kernel'], w + ad['a'] @ ad['b'] * cfg.lora.scale, atol=1e-6
  )
  # The sampler decodes with the adapters (folded in for unrolled layers, as they are for
  # scanned ones): greedy tokens of either tree agree.
  sp = sampling.SamplingParams(max_new_tokens=5, temperature=0.0)
  run = lambda p: sampling.sample(cfg, p, tokens, valid, jax.random.key(0), sp).tokens_BxG
  np.testing.assert_array_equal(run(policy), run(folded))
  if scan:
    assert lora.has_adapters(sampling.decode_params(policy, None, cfg))  # no folded copy
  else:
    with pytest.raises(ValueError, match='fold LoRA adapters'):
      sampling.decode_params(policy, None)  # the unrolled decode layout cannot hold them
    assert not lora.has_adapters(sampling.decode_params(policy, None, cfg))


def test_only_targeted_projections_get_adapters():
  cfg = _cfg(targets=('q', 'down'))
  _, adapters = lora.split(model_lib.init_params(cfg, jax.random.key(0)))
  assert set(adapters['layer_0']['attn']) == {'q_proj_lora'}
  assert set(adapters['layer_0']['mlp']) == {'down_proj_lora'}
  shapes = jax.tree.map(lambda x: x.shape, adapters['layer_0'])
  d, f, n, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.head_dim
  assert shapes['attn']['q_proj_lora'] == {'a': (d, 4), 'b': (4, n, h)}
  assert shapes['mlp']['down_proj_lora'] == {'a': (f, 4), 'b': (4, d)}


def test_bad_lora_settings_name_the_field():
  with pytest.raises(ValueError, match=r'model\.lora\.rank=-1 is invalid'):
    lora.LoraConfig(-1)
  with pytest.raises(ValueError, match=r'model\.lora\.alpha=0\.0 is invalid'):
    lora.LoraConfig(4, 0.0, ('q',))
  with pytest.raises(ValueError, match=r"model\.lora\.targets=\('q', 'qkv'\) is invalid"):
    lora.LoraConfig(4, 8.0, ('q', 'qkv'))
  with pytest.raises(ValueError, match=r'model\.lora\.targets=\(\) is invalid'):
    lora.LoraConfig(4, 8.0, ())
  from bond_jax.run import config as config_lib

  c = config_lib.load_config_file('configs/jbond_tiny_lora.py')
  c.model.lora = ml_collections.ConfigDict({'rank': 4, 'alpha': 8.0, 'targets': 'qv'})
  with pytest.raises(ConfigError, match=r"config\.model\.lora\.targets='qv' is invalid"):
    config_lib.validate(c)  # a string would read as ('q', 'v')
  c.model.lora = ml_collections.ConfigDict({'rank': 2.5, 'alpha': 8.0, 'targets': ('q',)})
  with pytest.raises(ConfigError, match=r'^config\.model\.lora\.rank=2\.5 is invalid'):
    config_lib.validate(c)


def test_adapters_are_sharded_by_size():
  """On 1 device every spec is trivially valid; the rule table places a's input dimension
  and b's first output dimension on 'fsdp' where they divide (checked on a fake mesh shape)."""

  class Mesh8:
    shape = {'data': 1, 'fsdp': 8, 'model': 1}

  p = jax.sharding.PartitionSpec
  assert sharding.param_spec('params/layer_0/attn/q_proj_lora/a', (64, 4), Mesh8) == p('fsdp')
  assert sharding.param_spec('params/layer_0/mlp/up_proj_lora/b', (4, 256), Mesh8) == p(
    None, 'fsdp'
  )
  assert sharding.param_spec('params/layer_0/attn/o_proj_lora/a', (4, 16, 4), Mesh8) == p()
  assert sharding.param_spec('anchor_params/layers/attn/q_proj_lora/a', (2, 64, 4), Mesh8) == p(
    None, 'fsdp'
  )


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A tiny Gemma 3 checkpoint (transformers), our LoRA policy on it with random adapters,
  exported merged and as adapters alone."""
  torch = pytest.importorskip('torch')
  import transformers

  d = tmp_path_factory.mktemp('lora')
  hf_cfg = transformers.Gemma3TextConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    sliding_window=4, layer_types=['sliding_attention', 'full_attention'],
  )  # fmt: skip
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(hf_cfg).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape) * 0.1)
  model.save_pretrained(d / 'base')
  base_cfg, base = hf.load_params(d / 'base')
  cfg = dataclasses.replace(base_cfg, lora=lora.LoraConfig(4, 8.0, ALL))
  adapters = _random_adapters(model_lib.init_adapters(cfg, jax.random.key(1)), seed=2)
  policy = lora.attach(base, adapters)
  hf.export_hf(base_cfg, lora.fold(cfg.lora, policy), d / 'merged')
  hf.export_peft(cfg, adapters, d / 'adapters', base_model=d / 'base')
  return d, cfg, policy


def _ours_and_inputs(cfg, policy):
  tokens = np.random.default_rng(1).integers(3, 96, (2, 7))
  ours = np.asarray(model_lib.forward(cfg, policy, jnp.asarray(tokens), jnp.ones((2, 7), bool)))
  return tokens, ours


def test_merged_export_loads_in_transformers(exported):
  import torch
  import transformers

  d, cfg, policy = exported
  tokens, ours = _ours_and_inputs(cfg, policy)
  model = transformers.AutoModelForCausalLM.from_pretrained(d / 'merged', dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)


def test_adapters_only_export_loads_in_peft(exported):
  import torch
  import transformers

  peft = pytest.importorskip('peft', reason='pip install peft==0.22.0 (peft checks the layout)')
  d, cfg, policy = exported
  tokens, ours = _ours_and_inputs(cfg, policy)
  base = transformers.AutoModelForCausalLM.from_pretrained(d / 'base', dtype=torch.float32)
  with torch.no_grad():
    plain = base(torch.tensor(tokens)).logits.numpy()
  model = peft.PeftModel.from_pretrained(base, d / 'adapters').eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
  assert np.abs(plain - theirs).max() > 0.1  # the adapters were applied
