"""Sharding checks on 8 fake CPU devices. Not collected by the main test run (the name
does not start with test_): tests/eight_devices.py runs it in a fresh process, because
the device count must be set before JAX starts its backend, and other test modules in
the main process have already started it with 1 device."""

from __future__ import annotations

import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bond_jax.models import decoder as model  # noqa: E402
from bond_jax.models import hf, reward_model, sharding  # noqa: E402

# D=64, N=4, K=1 (multi-query: k/v heads cannot split 4 ways, so they shard D), F=128, V=96.
CFG = model.ModelConfig(
  vocab_size=96,
  num_layers=2,
  embed_dim=64,
  hidden_dim=128,
  num_heads=4,
  num_kv_heads=1,
  head_dim=16,
  layer_types=('local', 'global'),
  sliding_window=4,
  use_post_norms=True,
  use_qk_norm=True,
  query_pre_attn_scalar=16,
  rope_local_base=1e4,
)
EXPECTED = {  # our parameter -> spec on a (data=2, model=4) mesh
  'embedder/embedding': P('model', None),
  'layer_0/attn/q_proj/kernel': P(None, 'model', None),
  'layer_0/attn/k_proj/kernel': P('model', None, None),  # K=1: falls back to D
  'layer_0/attn/v_proj/kernel': P('model', None, None),
  'layer_0/attn/o_proj/kernel': P('model', None, None),
  'layer_0/attn/q_norm/scale': P(),
  'layer_0/mlp/gate_proj/kernel': P(None, 'model'),
  'layer_0/mlp/up_proj/kernel': P(None, 'model'),
  'layer_0/mlp/down_proj/kernel': P('model', None),
  'layer_0/pre_attn_norm/scale': P(),
  'layer_0/post_ffw_norm/scale': P(),
  'final_norm/scale': P(),
}


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh(data=2, model=4)


def _specs(tree) -> dict[str, P]:
  return {sharding.path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(tree)}


def test_mesh(mesh):
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {'data': 2, 'model': 4}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_rule_table(mesh):
  abstract = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  specs = _specs(sharding.param_shardings(abstract, mesh))
  for name, spec in EXPECTED.items():
    assert specs[name] == spec, (name, specs[name], spec)
  # Nothing divides by 4 (vocab 30, D 30, F 30, heads 3): everything is replicated.
  odd = model.ModelConfig(
    vocab_size=30,
    num_layers=1,
    embed_dim=30,
    hidden_dim=30,
    num_heads=3,
    num_kv_heads=3,
    head_dim=10,
    tie_embeddings=False,
  )
  abstract = jax.eval_shape(lambda: model.init_params(odd, jax.random.key(0)))
  assert set(_specs(sharding.param_shardings(abstract, mesh)).values()) == {P()}


def test_sharded_load_places_each_tensor(mesh, tmp_path):
  params = model.init_params(CFG, jax.random.key(1))
  hf.export_hf(CFG, params, tmp_path / 'ckpt')
  cfg, loaded = hf.load_params(tmp_path / 'ckpt', shardings=mesh)
  assert cfg == CFG
  abstract = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  want = sharding.param_shardings(abstract, mesh)
  for (path, x), s, ref in zip(
    jax.tree_util.tree_leaves_with_path(loaded),
    jax.tree_util.tree_leaves(want),
    jax.tree_util.tree_leaves(params),
    strict=True,
  ):
    name = sharding.path_name(path)
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, name
    assert x.sharding.spec == s.spec, (name, x.sharding.spec, s.spec)
    assert len(x.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref), err_msg=name)
  assert _specs(jax.tree_util.tree_map(lambda x: x.sharding, loaded)).items() >= EXPECTED.items()
  sharding.assert_big_tensors_sharded(loaded, mesh, min_size=1024)
  # Same logits sharded (batch over 'data') as on one device.
  tokens = jnp.arange(40, dtype=jnp.int32).reshape(4, 10) % 96
  valid = jnp.ones((4, 10), bool).at[1, :3].set(False)
  step = jax.jit(lambda p, t, v: model.forward(CFG, p, t, v))
  batch = sharding.data_sharding(mesh)
  sharded = step(loaded, jax.device_put(tokens, batch), jax.device_put(valid, batch))
  single = step(params, tokens, valid)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)


def test_sharded_reward_load(mesh, tmp_path):
  params = reward_model.init_params(CFG, jax.random.key(2))
  hf.export_hf(CFG, params, tmp_path / 'rm', pad_token_id=0)
  _, loaded = hf.load_reward_params(tmp_path / 'rm', shardings=mesh)
  specs = _specs(jax.tree_util.tree_map(lambda x: x.sharding, loaded))
  assert specs['decoder/embedder/embedding'] == P('model', None)
  assert specs['score/kernel'] == P()


def test_big_tensor_check_names_the_replicated_tensor(mesh):
  params = model.init_params(CFG, jax.random.key(0))
  shardings = sharding.param_shardings(params, mesh)
  placed = jax.device_put(params, shardings)
  placed['layer_1']['mlp']['up_proj']['kernel'] = jax.device_put(
    params['layer_1']['mlp']['up_proj']['kernel'], NamedSharding(mesh, P())
  )
  with pytest.raises(AssertionError, match=r'layer_1/mlp/up_proj/kernel \(64, 128\)'):
    sharding.assert_big_tensors_sharded(placed, mesh, min_size=1024)
  sharding.assert_big_tensors_sharded(placed, mesh, min_size=10**6)  # small: not checked
