"""Our decoder and reward model against transformers' PyTorch models, plus checkpoint I/O.

Tiny random configs of every supported family are saved with `save_pretrained`,
loaded with `hf.load_params`, and run on the same tokens. All weights (norm scales
included) are redrawn at a size where every feature matters: Gemma 2 attention and
final soft-caps are small enough to bend the logits, sliding windows (4) are shorter
than the sequence (10), Gemma 3 has QK-norm, distinct local/global RoPE bases and
linear scaling, Llama has Llama-3.1 RoPE scaling, Qwen2 has q/k/v biases.

Parity metric: max |ours - torch| / max |torch| over the valid positions, <= 1e-5
(fp32 on CPU; we measure ~1e-7). A failure means the architecture (not precision)
differs: look at norms, RoPE, masking or soft-capping for that family.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bond_jax.models import decoder as model
from bond_jax.models import hf, hf_config, presets, reward_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

RTOL = 1e-5
V = 96
_COMMON = dict(
  vocab_size=V,
  hidden_size=32,
  intermediate_size=64,
  num_attention_heads=4,
  head_dim=16,
  max_position_embeddings=64,
  pad_token_id=0,
  bos_token_id=1,
  eos_token_id=2,
)


def _hf_config(family: str):
  if family == 'gemma':
    return transformers.GemmaConfig(num_hidden_layers=2, num_key_value_heads=1, **_COMMON)
  if family == 'gemma2':
    return transformers.Gemma2Config(
      num_hidden_layers=3,
      num_key_value_heads=2,
      query_pre_attn_scalar=24,
      attn_logit_softcapping=3.0,
      final_logit_softcapping=2.0,
      sliding_window=4,
      **_COMMON,
    )
  if family == 'gemma3_text':
    return transformers.Gemma3TextConfig(
      num_hidden_layers=3,
      num_key_value_heads=2,
      query_pre_attn_scalar=16,
      sliding_window=4,
      layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
      rope_parameters={
        'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6},
        'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4},
      },
      **_COMMON,
    )
  if family == 'llama':
    return transformers.LlamaConfig(
      num_hidden_layers=2,
      num_key_value_heads=2,
      tie_word_embeddings=False,
      rope_parameters={
        'rope_type': 'llama3',
        'rope_theta': 1e4,
        'factor': 4.0,
        'low_freq_factor': 1.0,
        'high_freq_factor': 4.0,
        'original_max_position_embeddings': 32,
      },
      **_COMMON,
    )
  if family == 'qwen2':
    return transformers.Qwen2Config(
      num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False, **_COMMON
    )
  raise AssertionError(family)


FAMILIES = ('gemma', 'gemma2', 'gemma3_text', 'llama', 'qwen2')


def _randomize(module, seed: int) -> None:
  """Redraw every weight: std 0.3 for matrices, 1 + N(0, 0.3) / N(0, 0.3) for norms."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.3
      if 'norm' in name and p.ndim == 1 and (p.data == 1).all():
        noise += 1.0  # Llama-style weight * x: keep the scale away from 0
      p.copy_(noise)


def _save(
  tmp_path, family: str, cls_name: str = 'AutoModelForCausalLM', seed: int = 0, **overrides
):
  config = _hf_config(family)
  for k, v in overrides.items():
    setattr(config, k, v)
  config._attn_implementation = 'eager'  # the reference implementation (soft-caps too)
  cls = getattr(transformers, cls_name)
  torch_model = cls.from_config(config) if cls_name.startswith('Auto') else cls(config)
  _randomize(torch_model, seed)
  torch_model.eval()
  path = tmp_path / f'{family}_{cls_name}'
  torch_model.save_pretrained(path)
  return torch_model, path


def _batch(left: bool = True):
  """Tokens [3, 10] with rows padded by 0, 3 and 6 pad tokens (left or right)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, V, size=(3, 10))
  valid = np.ones((3, 10), bool)
  for row, pads in ((1, 3), (2, 6)):
    cols = slice(0, pads) if left else slice(10 - pads, 10)
    valid[row, cols] = False
  tokens[~valid] = 0
  return tokens, valid


def _torch_run(torch_model, tokens, valid, padded: bool):
  kwargs = {}
  if padded:  # transformers does not derive positions from the mask outside generate()
    positions = np.maximum(np.cumsum(valid, axis=-1) - 1, 0)
    kwargs = dict(
      attention_mask=torch.tensor(valid.astype(np.int64)), position_ids=torch.tensor(positions)
    )
  with torch.no_grad():
    return torch_model(torch.tensor(tokens), **kwargs).logits.numpy()


def _rel_err(ours, theirs, valid=None) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if valid is not None:
    ours, theirs = ours[valid], theirs[valid]
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# Switching one of these off must break parity, so the configs above really test them.
_FEATURES = {
  'gemma': [dict(scale_embeddings=False), dict(norm_plus_one=False)],
  'gemma2': [
    dict(sliding_window=None, layer_types=()),
    dict(attn_logit_softcap=None),
    dict(final_logit_softcap=None),
    dict(query_pre_attn_scalar=None),
  ],
  'gemma3_text': [
    dict(rope_scale=1.0),
    dict(rope_local_base=None),
    dict(sliding_window=None, layer_types=()),
    dict(use_qk_norm=False),
  ],
  'llama': [dict(rope_llama3=None)],
  'qwen2': [dict(qkv_bias=False)],
}


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers(tmp_path, family):
  torch_model, path = _save(tmp_path, family)
  cfg, params = hf.load_params(path)
  tokens, valid = _batch(left=True)
  unpadded = np.ones_like(valid)
  for toks, mask, padded in ((tokens[:1].repeat(2, 0), unpadded[:2], False), (tokens, valid, True)):
    ours = model.forward(cfg, params, jnp.asarray(toks), jnp.asarray(mask))
    theirs = _torch_run(torch_model, toks, mask, padded)
    err = _rel_err(ours, theirs, mask)
    print(f'{family} padded={padded}: relative error {err:.2e}')
    assert err <= RTOL, f'{family} padded={padded}: relative error {err:.2e} > {RTOL}'
  for change in _FEATURES[family]:
    off = dataclasses.replace(cfg, **change)
    off_params = params if cfg.qkv_bias == off.qkv_bias else _drop_biases(params)
    ours = model.forward(off, off_params, jnp.asarray(tokens), jnp.asarray(valid))
    assert _rel_err(ours, theirs, valid) > 1e-3, f'{family}: {change} does not matter'


def _drop_biases(params):
  return {
    k: (
      {
        **v,
        'attn': {
          n: {'kernel': p['kernel']} if n.endswith('proj') else p for n, p in v['attn'].items()
        },
      }
      if k.startswith('layer')
      else v
    )
    for k, v in params.items()
  }


def test_config_mapping_switches_features(tmp_path):
  """The loaded configs really exercise the features the parity test claims to cover."""
  cfg = hf_config.config_from_hf(_hf_config('gemma2').to_dict())
  assert cfg.layer_types == ('local', 'global', 'local') and cfg.sliding_window == 4
  assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (3.0, 2.0)
  assert cfg.query_pre_attn_scalar == 24 and cfg.use_post_norms
  cfg = hf_config.config_from_hf(_hf_config('gemma3_text').to_dict())
  assert cfg.use_qk_norm and (cfg.rope_base, cfg.rope_local_base, cfg.rope_scale) == (1e6, 1e4, 8.0)
  cfg = hf_config.config_from_hf(_hf_config('llama').to_dict())
  assert cfg.rope_llama3 == (4.0, 1.0, 4.0, 32) and not cfg.norm_plus_one
  assert hf_config.config_from_hf(_hf_config('qwen2').to_dict()).qkv_bias
  # gemma3 (multimodal) configs: the nested text_config is used.
  nested = transformers.Gemma3Config(text_config=_hf_config('gemma3_text').to_dict()).to_dict()
  assert hf_config.config_from_hf(nested) == hf_config.config_from_hf(
    _hf_config('gemma3_text').to_dict()
  )


# The Hub's config.json files (written from memory: no network here), legacy fields and all.
_G1 = dict(
  model_type='gemma',
  hidden_act='gelu',
  head_dim=256,
  rope_theta=10000.0,
  vocab_size=256000,
  rms_norm_eps=1e-6,
  torch_dtype='bfloat16',
)
_G2 = dict(
  model_type='gemma2',
  hidden_act='gelu_pytorch_tanh',
  attn_logit_softcapping=50.0,
  hidden_activation='gelu_pytorch_tanh',
  final_logit_softcapping=30.0,
  head_dim=256,
  query_pre_attn_scalar=256,
  rope_theta=10000.0,
  sliding_window=4096,
  cache_implementation='hybrid',
  vocab_size=256000,
  torch_dtype='float32',
)
HUB_CONFIGS = {
  'gemma_2b': dict(
    _G1,
    hidden_size=2048,
    intermediate_size=16384,
    num_attention_heads=8,
    num_hidden_layers=18,
    num_key_value_heads=1,
  ),
  'gemma_7b': dict(
    _G1,
    hidden_size=3072,
    intermediate_size=24576,
    num_attention_heads=16,
    num_hidden_layers=28,
    num_key_value_heads=16,
  ),
  'gemma2_2b': dict(
    _G2,
    hidden_size=2304,
    intermediate_size=9216,
    num_attention_heads=8,
    num_hidden_layers=26,
    num_key_value_heads=4,
  ),
  'gemma2_9b': dict(
    _G2,
    hidden_size=3584,
    intermediate_size=14336,
    num_attention_heads=16,
    num_hidden_layers=42,
    num_key_value_heads=8,
  ),
  'gemma2_27b': dict(
    _G2,
    hidden_size=4608,
    intermediate_size=36864,
    num_attention_heads=32,
    num_hidden_layers=46,
    num_key_value_heads=16,
    head_dim=128,
    query_pre_attn_scalar=144,
  ),
  'gemma3_1b': dict(
    model_type='gemma3_text',
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    head_dim=256,
    hidden_activation='gelu_pytorch_tanh',
    hidden_size=1152,
    intermediate_size=6912,
    max_position_embeddings=32768,
    num_attention_heads=4,
    num_hidden_layers=26,
    num_key_value_heads=1,
    query_pre_attn_scalar=256,
    rms_norm_eps=1e-6,
    rope_local_base_freq=10000,
    rope_scaling=None,
    rope_theta=1000000,
    sliding_window=512,
    sliding_window_pattern=6,
    vocab_size=262144,
  ),
  # google/gemma-3-270m, as scripts/import_gguf.py writes it from the PyPI package's GGUF
  # file (layer_types spelt out, rope_parameters per layer type).
  'gemma3_270m': dict(
    model_type='gemma3_text',
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    head_dim=256,
    hidden_activation='gelu_pytorch_tanh',
    hidden_size=640,
    intermediate_size=2048,
    layer_types=['sliding_attention'] * 5
    + ['full_attention']
    + ['sliding_attention'] * 5
    + ['full_attention']
    + ['sliding_attention'] * 5
    + ['full_attention'],
    max_position_embeddings=32768,
    num_attention_heads=4,
    num_hidden_layers=18,
    num_key_value_heads=1,
    query_pre_attn_scalar=256,
    rms_norm_eps=1e-6,
    rope_parameters={
      'full_attention': {'rope_theta': 1000000.0, 'rope_type': 'default'},
      'sliding_attention': {'rope_theta': 10000.0, 'rope_type': 'default'},
    },
    sliding_window=512,
    tie_word_embeddings=True,
    vocab_size=262144,
  ),
  'gemma3_4b': dict(
    model_type='gemma3',
    mm_tokens_per_image=256,
    torch_dtype='bfloat16',
    text_config=dict(
      hidden_size=2560,
      intermediate_size=10240,
      model_type='gemma3_text',
      num_hidden_layers=34,
      rope_scaling={'factor': 8.0, 'rope_type': 'linear'},
      sliding_window=1024,
    ),
    vision_config=dict(
      hidden_size=1152,
      image_size=896,
      intermediate_size=4304,
      model_type='siglip_vision_model',
      num_attention_heads=16,
      num_hidden_layers=27,
      patch_size=14,
      vision_use_head=False,
    ),
  ),
}


@pytest.mark.parametrize('name', sorted(HUB_CONFIGS))
def test_presets_match_hub_configs(name):
  assert hf_config.config_from_hf(HUB_CONFIGS[name]) == presets.PRESETS[name]


@pytest.mark.parametrize(
  'family,cls_name',
  [('gemma', 'GemmaForSequenceClassification'), ('llama', 'LlamaForSequenceClassification')],
)
def test_reward_scores_match_transformers(tmp_path, family, cls_name):
  torch_model, path = _save(tmp_path, family, cls_name, num_labels=1)
  cfg, params = hf.load_reward_params(path)
  assert params['score']['kernel'].shape == (cfg.embed_dim, 1)
  for left in (True, False):
    tokens, valid = _batch(left=left)
    ours = reward_model.score(cfg, params, jnp.asarray(tokens), jnp.asarray(valid))
    theirs = _torch_run(torch_model, tokens, valid, padded=True)[:, 0]
    print(f'{family} reward left={left}: relative error {_rel_err(ours, theirs):.2e}')
    assert _rel_err(ours, theirs) <= RTOL, (left, ours, theirs)
  # Unpadded, without a mask on the torch side.
  tokens = np.where(tokens == 0, 5, tokens)
  theirs = _torch_run(torch_model, tokens, np.ones_like(valid), padded=False)[:, 0]
  ours = reward_model.score(cfg, params, jnp.asarray(tokens), jnp.ones(tokens.shape, bool))
  assert _rel_err(ours, theirs) <= RTOL


@pytest.mark.parametrize('family', FAMILIES)
def test_export_round_trip(tmp_path, family):
  torch_model, path = _save(tmp_path, family, seed=1)
  cfg, params = hf.load_params(path)
  # Small shards for one family, to cover the sharded index on both sides.
  shard = 4096 if family == 'gemma2' else 5 * 2**30
  tok_dir = tmp_path / 'tok'
  tok_dir.mkdir()
  (tok_dir / 'tokenizer_config.json').write_text('{}')
  out = hf.export_hf(cfg, params, tmp_path / 'export', tokenizer_dir=tok_dir, max_shard_bytes=shard)
  assert (out / 'tokenizer_config.json').is_file()
  assert (out / 'model.safetensors.index.json').is_file() == (family == 'gemma2')
  cfg2, params2 = hf.load_params(out)
  assert cfg2 == cfg
  for a, b in zip(
    jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2), strict=True
  ):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation='eager', dtype=torch.float32
  ).eval()
  assert type(reloaded) is type(torch_model)
  tokens, valid = _batch()
  np.testing.assert_array_equal(
    _torch_run(reloaded, tokens, valid, True), _torch_run(torch_model, tokens, valid, True)
  )


def test_export_of_our_random_init_loads_in_transformers(tmp_path):
  """The other direction: params born in JAX (Gemma 3 style, bf16) read by transformers."""
  cfg = model.ModelConfig(
    vocab_size=V,
    num_layers=2,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    layer_types=('local', 'global'),
    sliding_window=4,
    use_post_norms=True,
    use_qk_norm=True,
    query_pre_attn_scalar=16,
    rope_base=1e6,
    rope_local_base=1e4,
    dtype='float32',
    param_dtype='bfloat16',
  )
  params = model.init_params(cfg, jax.random.key(0))
  params = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.ones_like(x), params)  # nonzero norms
  out = hf.export_hf(cfg, params, tmp_path / 'ours')
  assert json.loads((out / 'config.json').read_text())['model_type'] == 'gemma3_text'
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation='eager', dtype=torch.float32
  ).eval()
  tokens, valid = _batch()
  cfg32 = dataclasses.replace(cfg, param_dtype='float32')
  params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  ours = model.forward(cfg32, params32, jnp.asarray(tokens), jnp.asarray(valid))
  assert _rel_err(ours, _torch_run(reloaded, tokens, valid, True), valid) <= RTOL
  # bf16 on disk: loads bitwise as bf16, and exactly as its fp32 widening by default.
  cfg_bf16, loaded = hf.load_params(out, dtype='bfloat16')
  assert cfg_bf16 == dataclasses.replace(cfg, dtype='bfloat16')
  cfg_f32, loaded32 = hf.load_params(out)
  assert cfg_f32 == dataclasses.replace(cfg32, dtype='float32')
  for a, b, c in zip(*map(jax.tree_util.tree_leaves, (params, loaded, loaded32)), strict=True):
    assert b.dtype == jnp.bfloat16 and c.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c))


@pytest.mark.parametrize('prefix', ['language_model.model.', 'model.language_model.'])
def test_multimodal_gemma3_checkpoint_layout(tmp_path, prefix):
  """gemma3 (image-text) checkpoints: nested text_config, language-model tensor prefixes
  (Hub files use 'language_model.model.', transformers 5 saves 'model.language_model.')."""
  _, path = _save(tmp_path, 'gemma3_text')
  cfg, params = hf.load_params(path)
  weights = load_file(path / 'model.safetensors')
  renamed = {prefix + k.removeprefix('model.'): v for k, v in weights.items()}
  renamed['vision_tower.vision_model.post_layernorm.weight'] = np.ones(4, np.float32)
  mm = tmp_path / 'mm'
  mm.mkdir()
  save_file(renamed, mm / 'model.safetensors', metadata={'format': 'pt'})
  text = json.loads((path / 'config.json').read_text())
  nested = transformers.Gemma3Config(text_config=text).to_dict()
  (mm / 'config.json').write_text(json.dumps(nested))
  cfg2, params2 = hf.load_params(mm)
  assert cfg2 == cfg
  for a, b in zip(
    jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Errors that name the problem.


def test_wrong_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    hf.load_params(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='No config.json'):
    hf.load_params(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(_hf_config('gemma').to_dict()))
  with pytest.raises(FileNotFoundError, match='No safetensors'):
    hf.load_params(tmp_path)


def test_unsupported_architecture_error():
  with pytest.raises(ValueError, match=r"model_type 'mistral'.*supported: gemma"):
    hf_config.config_from_hf(transformers.MistralConfig().to_dict())


def test_missing_and_misshapen_tensor_errors(tmp_path):
  _, path = _save(tmp_path, 'gemma')
  weights = load_file(path / 'model.safetensors')
  name = 'model.layers.1.mlp.down_proj.weight'
  save_file(
    {k: v for k, v in weights.items() if k != name},
    path / 'model.safetensors',
    metadata={'format': 'pt'},
  )
  with pytest.raises(KeyError, match=f'missing tensor.*{name}'):
    hf.load_params(path)
  name = 'model.layers.0.self_attn.k_proj.weight'
  bad = {**weights, name: np.zeros((32, 32), np.float32)}
  save_file(bad, path / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=rf'{name}.*shape \(32, 32\), expected \(16, 32\)'):
    hf.load_params(path)


@pytest.mark.parametrize('family', ['gemma2', 'gemma3_text', 'qwen2'])
def test_scanned_layers_load_match_and_export(tmp_path, family):
  """A checkpoint loaded as a scan over layers (each layer stacked on a leading axis) runs
  to transformers' logits, holds the unrolled load's tensors, and exports the same files
  (small shards, so a stack's layers are split across files)."""
  torch_model, path = _save(tmp_path, family, seed=2)
  cfg, params = hf.load_params(path)
  scan = dataclasses.replace(cfg, scan_layers=True)
  _, stacked = hf.load_params(path, cfg=scan)
  for i in range(cfg.num_layers):
    jax.tree.map(
      lambda s, u, i=i: np.testing.assert_array_equal(s[i], u),
      stacked['layers'],
      params[f'layer_{i}'],
    )
  tokens, valid = _batch(left=True)
  theirs = _torch_run(torch_model, tokens, valid, True)
  ours = model.forward(scan, stacked, jnp.asarray(tokens), jnp.asarray(valid))
  assert _rel_err(ours, theirs, valid) <= RTOL
  for change in _FEATURES[family]:  # each feature still matters inside the scan
    off = dataclasses.replace(scan, **change)
    off_params = stacked if scan.qkv_bias == off.qkv_bias else _drop_biases(stacked)
    ours = model.forward(off, off_params, jnp.asarray(tokens), jnp.asarray(valid))
    assert _rel_err(ours, theirs, valid) > 1e-3, f'{family}: {change} does not matter'

  a = hf.export_hf(cfg, params, tmp_path / 'unrolled', max_shard_bytes=4096)
  b = hf.export_hf(scan, stacked, tmp_path / 'scanned', max_shard_bytes=4096)
  assert json.loads((b / 'config.json').read_text()) == json.loads((a / 'config.json').read_text())

  def tensors(out):  # every tensor of a sharded export (shards hold them in another order)
    index = json.loads((out / 'model.safetensors.index.json').read_text())
    found = {}
    for file in sorted(set(index['weight_map'].values())):
      found.update(load_file(out / file))
    assert sorted(found) == sorted(index['weight_map'])
    return index['metadata'], found

  (meta_a, want), (meta_b, got) = tensors(a), tensors(b)
  assert meta_b == meta_a and sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
