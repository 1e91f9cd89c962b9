"""Sharding policy: the rule table's choices on meshes of any shape (abstract meshes, no
devices needed). The 8-device checks (sharding_8dev_checks.py) run in a background process
(tests/eight_devices.py)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from bond_jax.models import decoder as model
from bond_jax.models import presets, sharding

FM = ('fsdp', 'model')


def _mesh(fsdp: int, model_: int, data: int = 1) -> jax.sharding.AbstractMesh:
  return jax.sharding.AbstractMesh(
    (data, fsdp, model_), ('data', 'fsdp', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )


def test_on_eight_fake_devices(eight_device_sharding):
  assert eight_device_sharding.get('exit_code') == 0, eight_device_sharding['output'][-9000:]


# (name, shape) -> spec on an fsdp=4 x model=2 mesh, worked out by hand from the docstring's
# order: model on its dimension and fsdp on D; both on D; both on the model dimension; each
# alone; replicated.
FSDP4_MODEL2 = {
  ('embedder/embedding', (96, 64)): P('model', 'fsdp'),  # V / model, D / fsdp
  ('embedder/embedding', (95, 64)): P(None, FM),  # V odd: both on D
  ('embedder/embedding', (96, 6)): P(FM, None),  # D not / 4: both on V
  ('embedder/embedding', (4, 5)): P('model', None),
  ('embedder/embedding', (5, 6)): P(None, 'model'),
  ('embedder/embedding', (3, 5)): P(),
  ('layer_0/attn/q_proj/kernel', (64, 4, 16)): P('fsdp', 'model', None),
  ('layer_0/attn/k_proj/kernel', (64, 1, 16)): P(FM, None, None),  # multi-query: K=1
  ('layer_0/attn/v_proj/kernel', (6, 8, 16)): P(None, FM, None),  # D not / 4
  ('layer_0/attn/v_proj/kernel', (6, 2, 16)): P(None, 'model', None),
  ('layer_0/attn/q_proj/bias', (4, 16)): P('model', None),
  ('layer_0/attn/k_proj/bias', (1, 16)): P(),
  ('layer_0/attn/o_proj/kernel', (4, 16, 64)): P('model', None, 'fsdp'),
  ('layer_0/attn/o_proj/kernel', (1, 16, 64)): P(None, None, FM),
  ('layer_0/mlp/gate_proj/kernel', (64, 256)): P('fsdp', 'model'),
  ('layer_0/mlp/up_proj/kernel', (64, 3)): P(FM, None),
  ('layer_0/mlp/down_proj/kernel', (256, 64)): P('model', 'fsdp'),
  ('lm_head/kernel', (64, 96)): P('fsdp', 'model'),
  ('score/kernel', (64, 1)): P('fsdp', None),
  ('score/kernel', (6, 1)): P(),
  ('layer_0/pre_attn_norm/scale', (64,)): P(),
  ('layer_0/attn/k_norm/scale', (16,)): P(),
  ('step', ()): P(),
  # Every tree holding a model follows the same rules: reward model, Adam's moments.
  ('decoder/layer_1/mlp/gate_proj/kernel', (64, 256)): P('fsdp', 'model'),
  ('opt_state/1/0/mu/layer_0/attn/k_proj/kernel', (64, 1, 16)): P(FM, None, None),
  ('opt_state/1/0/nu/embedder/embedding', (96, 64)): P('model', 'fsdp'),
  ('opt_state/1/0/count', ()): P(),
  # A scan over layers stacks them on a leading axis that stays whole; the rest as above.
  ('layers/attn/q_proj/kernel', (18, 64, 4, 16)): P(None, 'fsdp', 'model', None),
  ('layers/attn/k_proj/kernel', (3, 64, 1, 16)): P(None, FM, None, None),
  ('layers/mlp/down_proj/kernel', (3, 256, 64)): P(None, 'model', 'fsdp'),
  ('layers/pre_attn_norm/scale', (3, 64)): P(None),
  ('decoder/layers/mlp/gate_proj/kernel', (2, 64, 256)): P(None, 'fsdp', 'model'),
  ('opt_state/1/0/mu/layers/attn/o_proj/kernel', (2, 4, 16, 64)): P(None, 'model', None, 'fsdp'),
}


@pytest.mark.parametrize(('name', 'shape'), list(FSDP4_MODEL2))
def test_rule_table_falls_back_dimension_by_dimension(name, shape):
  assert sharding.param_spec(name, shape, _mesh(fsdp=4, model_=2)) == FSDP4_MODEL2[name, shape]


def test_fsdp_alone_on_the_model_dimension():
  # fsdp=3, model=2, V=9, D=5: only V divides, and only by fsdp (the last fallback).
  assert sharding.param_spec('embedder/embedding', (9, 5), _mesh(3, 2)) == P('fsdp', None)


def test_any_mesh_gets_a_spec_that_divides():
  names = {
    2: ('embedder/embedding', 'mlp/up_proj/kernel', 'mlp/down_proj/kernel', 'lm_head/kernel'),
    3: ('attn/q_proj/kernel', 'attn/o_proj/kernel'),
  }
  for fsdp, model_ in ((1, 1), (2, 1), (1, 2), (4, 2), (2, 4), (3, 2), (8, 1), (1, 8)):
    mesh = _mesh(fsdp, model_)
    for ndim, rule_names in names.items():
      for shape, name in itertools.product(
        itertools.product((1, 3, 8, 12, 24), repeat=ndim), rule_names
      ):
        spec = sharding.param_spec(name, shape, mesh)
        for dim, axes in zip(shape, spec, strict=False):
          ways = 1
          for a in () if axes is None else (axes if isinstance(axes, tuple) else (axes,)):
            ways *= mesh.shape[a]
          assert dim % ways == 0, (name, shape, fsdp, model_, spec)
        if all(d % 24 == 0 for d in shape):  # divisible enough: both axes are used
          assert {'fsdp', 'model'} <= set(jax.tree.leaves(tuple(spec))), (name, shape, spec)


def test_single_device_mesh_replicates_nothing_to_check():
  mesh = sharding.make_mesh(data=1, fsdp=1, model=1)
  params = jax.eval_shape(lambda: model.init_params(presets.TINY, jax.random.key(0)))
  specs = jax.tree_util.tree_leaves(sharding.param_shardings(params, mesh))
  assert specs[0].spec == P('model', 'fsdp')  # divisible by 1: the rule still applies
  sharding.assert_big_tensors_sharded(params, mesh, min_size=1)  # both axes 1: no-op


def test_activation_constraints_are_no_ops_outside_a_mesh_context():
  tree = {'x': jnp.ones((4, 3)), 's': jnp.zeros(())}
  out = sharding.constrain_batch(tree)
  assert out['x'] is tree['x'] and out['s'] is tree['s']
  assert sharding.gather_fsdp(tree['x'], 'embedder/embedding') is tree['x']
