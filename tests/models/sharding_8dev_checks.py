"""Sharding checks on 8 fake CPU devices. Not collected by the main test run (the name
does not start with test_): tests/eight_devices.py runs it in a fresh process, because
the device count must be set before JAX starts its backend, and other test modules in
the main process have already started it with 1 device.

The expected specs below are written out by hand for each mesh, not computed from
`sharding.PARAM_RULES`: a change of the table that moves a tensor fails here."""

from __future__ import annotations

import pathlib
import re

import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bond_jax.models import decoder as model  # noqa: E402
from bond_jax.models import (  # noqa: E402
  hf,
  reward_model,
  sharding,
)
from bond_jax.run import config as config_lib  # noqa: E402
from bond_jax.run import setup as run_setup  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FM = ('fsdp', 'model')  # both parameter axes on one dimension

# D=64, N=4, K=1 (multi-query: k/v heads cannot split over 'model'), F=128, V=96.
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
EXPECTED = {  # CFG's parameter -> spec on a (data, fsdp, model) = (2, 2, 2) mesh
  'embedder/embedding': P('model', 'fsdp'),
  'layer_0/attn/q_proj/kernel': P('fsdp', 'model', None),
  'layer_0/attn/k_proj/kernel': P(FM, None, None),  # K=1: both axes on D
  'layer_0/attn/v_proj/kernel': P(FM, None, None),
  'layer_0/attn/o_proj/kernel': P('model', None, 'fsdp'),
  'layer_0/attn/q_norm/scale': P(),
  'layer_0/mlp/gate_proj/kernel': P('fsdp', 'model'),
  'layer_0/mlp/up_proj/kernel': P('fsdp', 'model'),
  'layer_0/mlp/down_proj/kernel': P('model', 'fsdp'),
  'layer_0/pre_attn_norm/scale': P(),
  'layer_0/post_ffw_norm/scale': P(),
  'final_norm/scale': P(),
}

# The micro runs' model (presets.TINY: V=32, D=64, N=4, K=1, H=16, F=256, tied embeddings):
# each parameter's spec on each mesh of tests/eight_devices.py.
_TINY_FIRST_CHOICE = {
  'embedder/embedding': P('model', 'fsdp'),
  'attn/q_proj/kernel': P('fsdp', 'model', None),
  'attn/k_proj/kernel': P('fsdp', 'model', None),
  'attn/v_proj/kernel': P('fsdp', 'model', None),
  'attn/o_proj/kernel': P('model', None, 'fsdp'),
  'mlp/gate_proj/kernel': P('fsdp', 'model'),
  'mlp/up_proj/kernel': P('fsdp', 'model'),
  'mlp/down_proj/kernel': P('model', 'fsdp'),
  'norm/scale': P(),
}
TINY_EXPECTED = {
  (8, 1, 1): _TINY_FIRST_CHOICE,
  (1, 8, 1): _TINY_FIRST_CHOICE,
  (2, 2, 2): {
    **_TINY_FIRST_CHOICE,
    'attn/k_proj/kernel': P(FM, None, None),  # K=1 does not split over model=2
    'attn/v_proj/kernel': P(FM, None, None),
  },
}
TINY_EMBEDDING_SHARD = {
  (8, 1, 1): (32, 64),
  (1, 8, 1): (32, 8),
  (2, 2, 2): (16, 32),
}  # [V/model, D/fsdp]


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh(data=2, fsdp=2, model=2)


def _specs(tree) -> dict[str, P]:
  return {sharding.path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(tree)}


def _shard_shape(shape: tuple[int, ...], spec: P, mesh) -> tuple[int, ...]:
  out = list(shape)
  for dim, axes in enumerate(spec):
    for a in () if axes is None else (axes if isinstance(axes, tuple) else (axes,)):
      out[dim] //= mesh.shape[a]
  return tuple(out)


def test_mesh(mesh):
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  rest = sharding.make_mesh(data=1, fsdp=-1, model=2)  # -1: all remaining devices
  assert dict(rest.shape) == {'data': 1, 'fsdp': 4, 'model': 2}
  assert rest.devices.size == 8


def test_rule_table(mesh):
  abstract = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  specs = _specs(sharding.param_shardings(abstract, mesh))
  for name, spec in EXPECTED.items():
    assert specs[name] == spec, (name, specs[name], spec)
  # Nothing that is split divides by 2 (vocab 15, D 15, F 15, heads 3): all replicated.
  odd = model.ModelConfig(
    vocab_size=15,
    num_layers=1,
    embed_dim=15,
    hidden_dim=15,
    num_heads=3,
    num_kv_heads=3,
    head_dim=6,  # never split (and rotary embeddings need it even)
    tie_embeddings=False,
  )
  abstract = jax.eval_shape(lambda: model.init_params(odd, jax.random.key(0)))
  assert set(_specs(sharding.param_shardings(abstract, mesh)).values()) == {P()}


@pytest.mark.parametrize('sizes', sorted(TINY_EXPECTED))
def test_train_state_is_sharded_as_declared(sizes):
  """The loop's TrainState (jbond_tiny: policy, EMA anchor, pi_ref, clipped Adam) placed with
  `param_shardings(abstract state, mesh)`: every tree by the parameter's own spec."""
  c = config_lib.load_config_file(ROOT / 'configs' / 'jbond_tiny.py')
  c.mesh.data, c.mesh.fsdp, c.mesh.model = sizes
  c.optim.grad_clip_norm = 1.0  # a chain of two transforms: the moments sit deeper
  mesh = run_setup.make_mesh(c)
  assert tuple(mesh.shape.values()) == sizes
  abstract = run_setup.abstract_state(run_setup.build(c, mesh))
  assert abstract.anchor_params is not None
  shardings = sharding.param_shardings(abstract, mesh)
  state = jax.jit(
    lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract), out_shardings=shardings
  )()
  expected = TINY_EXPECTED[sizes]
  trees = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    name = sharding.path_name(path)
    m = re.fullmatch(r'(params|anchor_params|ref_params|opt_state/.*/(?:mu|nu))/(.*)', name)
    want = P()  # step, rng, Adam's count
    if m:
      param = m[2]
      trees.setdefault(re.sub(r'(/\d+)+/', '/', m[1]), []).append(param)
      (key,) = [k for k in expected if param.endswith(k)]
      want = expected[key]
      if param == 'embedder/embedding':
        assert x.addressable_shards[0].data.shape == TINY_EMBEDDING_SHARD[sizes], name
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, name
    assert x.sharding.spec == want, (name, x.sharding.spec, want)
    assert len(x.addressable_shards) == 8
    assert x.addressable_shards[0].data.shape == _shard_shape(x.shape, want, mesh), name
  policy = sorted(trees['params'])
  assert len(policy) == 2 + 9 * 2  # embedding, final norm, 9 tensors per layer
  assert {k: sorted(v) for k, v in trees.items()} == {
    t: policy for t in ('params', 'anchor_params', 'ref_params', 'opt_state/mu', 'opt_state/nu')
  }


def test_sharded_load_places_each_tensor(mesh, tmp_path):
  params = model.init_params(CFG, jax.random.key(1))
  hf.export_hf(CFG, params, tmp_path / 'ckpt')
  cfg, loaded = hf.load_params(tmp_path / 'ckpt', shardings=mesh)
  assert cfg == CFG
  for (path, x), ref in zip(
    jax.tree_util.tree_leaves_with_path(loaded), jax.tree_util.tree_leaves(params), strict=True
  ):
    name = sharding.path_name(path)
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, name
    spec = EXPECTED.get(re.sub(r'layer_\d+', 'layer_0', name), x.sharding.spec)
    assert x.sharding.spec == spec, (name, x.sharding.spec, spec)
    assert x.addressable_shards[0].data.shape == _shard_shape(x.shape, spec, mesh), name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref), err_msg=name)
  assert _specs(jax.tree_util.tree_map(lambda x: x.sharding, loaded)).items() >= EXPECTED.items()
  sharding.assert_big_tensors_sharded(loaded, mesh, min_size=1024)
  # Same logits sharded (batch over 'data' and 'fsdp') as on one device.
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
  for name, spec in EXPECTED.items():  # the reward model's decoder: the policy's rules
    assert specs[f'decoder/{name}'] == spec, name
  assert specs['score/kernel'] == P('fsdp', None)


def test_gather_fsdp_drops_only_the_fsdp_axis(mesh):
  table = jax.device_put(jnp.ones((96, 64)), NamedSharding(mesh, P('model', 'fsdp')))
  kv = jax.device_put(jnp.ones((64, 1, 16)), NamedSharding(mesh, P(FM, None, None)))
  f = jax.jit(
    lambda t, k: (
      sharding.gather_fsdp(t, 'embedder/embedding'),
      sharding.gather_fsdp(k, 'layer_0/attn/k_proj/kernel'),
    )
  )
  assert f(table, kv)[0].sharding.spec == P('model', 'fsdp')  # no mesh context: unchanged
  with jax.set_mesh(mesh):
    t, k = f(table, kv)
  assert t.sharding.spec == k.sharding.spec == P('model')  # gathered over fsdp, still over model
  assert t.addressable_shards[0].data.shape == (48, 64)


def test_constrain_batch_splits_rows_inside_a_mesh_context(mesh):
  w = jax.device_put(jnp.ones((4, 16)), NamedSharding(mesh, P(None, 'model')))
  f = jax.jit(lambda x, w: sharding.constrain_batch({'h': x @ w, 'odd': x[:6], 's': x.sum()}))
  x = jnp.ones((8, 4))
  assert f(x, w)['h'].sharding.spec != P(('data', 'fsdp'), 'model')  # no mesh context
  with jax.set_mesh(mesh):
    out = f(x, w)
  assert out['h'].sharding.spec == P(('data', 'fsdp'), 'model')  # other dims left to XLA
  assert out['h'].addressable_shards[0].data.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(out['h']), np.full((8, 16), 4.0))


def test_big_tensor_check_names_the_replicated_tensor(mesh):
  params = model.init_params(CFG, jax.random.key(0))
  placed = jax.device_put(params, sharding.param_shardings(params, mesh))
  up = params['layer_1']['mlp']['up_proj']['kernel']
  placed['layer_1']['mlp']['up_proj']['kernel'] = jax.device_put(up, NamedSharding(mesh, P()))
  named = r"^1 parameter.*'fsdp'=2, 'model'=2.*: layer_1/mlp/up_proj/kernel \(64, 128\)"
  with pytest.raises(AssertionError, match=named):
    sharding.assert_big_tensors_sharded(placed, mesh, min_size=1024)
  sharding.assert_big_tensors_sharded(placed, mesh, min_size=10**6)  # small: not checked
  for spec in (P('fsdp', None), P(None, 'model')):  # either parameter axis is enough
    placed['layer_1']['mlp']['up_proj']['kernel'] = jax.device_put(up, NamedSharding(mesh, spec))
    sharding.assert_big_tensors_sharded(placed, mesh, min_size=1024)
  # Only 'fsdp' splits parameters on (1, 8, 1); nothing does on (8, 1, 1).
  fsdp8, data8 = sharding.make_mesh(1, 8, 1), sharding.make_mesh(8, 1, 1)
  replicated = jax.device_put(params, NamedSharding(fsdp8, P()))
  with pytest.raises(AssertionError, match=r"none of the mesh axes 'fsdp'=8 \("):
    sharding.assert_big_tensors_sharded(replicated, fsdp8, min_size=1024)
  sharding.assert_big_tensors_sharded(
    jax.device_put(params, NamedSharding(data8, P())), data8, min_size=1
  )
