"""Sharding policy, in one place: a mesh, a rule table for parameters, a check.

The mesh has two axes: 'data' (batch; parameters are replicated along it) and
'model' (tensor parallelism). Each parameter is matched, by its '/'-joined path
(e.g. 'layer_3/attn/q_proj/kernel'), against `PARAM_RULES`; the first rule whose
regex matches gives an ordered list of candidate PartitionSpecs, and the first
candidate whose sharded dimensions divide evenly by the mesh axis sizes is used.
If none divides (e.g. a single key/value head under multi-query attention), the
next candidate shards another dimension, and the last resort is replicated.
Anything no rule matches (norm scales, small heads) is replicated.

Typical use, so that parameters are born sharded:

  mesh = make_mesh(data=2, model=4)
  abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  shardings = param_shardings(abstract, mesh)
  params = jax.jit(lambda: model.init_params(cfg, jax.random.key(0)),
                   out_shardings=shardings)()
  assert_big_tensors_sharded(params, mesh)
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bond_jax.types import PyTree

DATA, FSDP, MODEL = 'data', 'fsdp', 'model'
BATCH_AXES = (DATA, FSDP)  # the batch is split over both data-parallel axes

# (path regex, candidate specs in order of preference). Shapes follow model.py:
# embedding [V, D], q/k/v kernels [D, N|K, H] and biases [N|K, H], o_proj kernel
# [N, H, D], MLP gate/up [D, F] and down [F, D], lm_head [D, V], reward score [D, 1].
PARAM_RULES: tuple[tuple[str, tuple[P, ...]], ...] = (
  (r'embedder/embedding$', (P(MODEL, None), P(None, MODEL))),  # vocab-sharded
  (r'attn/[qkv]_proj/kernel$', (P(None, MODEL, None), P(MODEL, None, None))),  # heads, else D
  (r'attn/[qkv]_proj/bias$', (P(MODEL, None),)),
  (r'attn/o_proj/kernel$', (P(MODEL, None, None), P(None, None, MODEL))),  # heads, else D
  (r'mlp/(gate|up)_proj/kernel$', (P(None, MODEL), P(MODEL, None))),  # F, else D
  (r'mlp/down_proj/kernel$', (P(MODEL, None), P(None, MODEL))),  # F, else D
  (r'lm_head/kernel$', (P(None, MODEL), P(MODEL, None))),  # vocab, else D
  (r'norm/scale$', (P(),)),  # norms (and q/k norms) replicated
)


def resolve_mesh_shape(data: int, fsdp: int, model: int, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, model) with at most one -1 replaced by "all remaining devices".

  Without a -1 the mesh may use fewer than `num_devices` (the first ones).
  """
  sizes = {'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.model': model}
  for name, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f'config.{name}={size!r} is invalid: give a positive integer or -1.')
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(
      f'config.{free[1]}=-1: only one mesh axis may be -1 ("all remaining devices"); '
      f'{" and ".join(free)} both are.'
    )
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
        f'config.{free[0]}=-1: the other mesh axes ({fixed} devices) do not divide the '
        f'{num_devices} devices; change them so that they do.'
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed > num_devices:
    raise ValueError(
      f'config.mesh.data * mesh.fsdp * mesh.model = {fixed} exceeds the {num_devices} devices; '
      'use smaller axes or -1 for "all remaining devices".'
    )
  return sizes['mesh.data'], sizes['mesh.fsdp'], sizes['mesh.model']


def make_mesh(data: int, fsdp: int = 1, model: int = 1, devices: Any = None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh, all axes explicitly Auto; a -1 size takes all
  remaining devices of `devices` (default: every device)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(data, fsdp, model, len(devices))
  return jax.make_mesh(
    shape,
    (DATA, FSDP, MODEL),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=devices[: int(np.prod(shape))],
  )


def path_name(path: tuple[Any, ...]) -> str:
  """'layer_0/attn/q_proj/kernel' for a tree path of dict keys / attributes / indices."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _divides(spec: P, shape: tuple[int, ...], mesh: Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  for dim, axes in zip(shape, spec, strict=False):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if dim % int(np.prod([mesh.shape[a] for a in names])):
      return False
  return True


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of one parameter under `PARAM_RULES` (replicated when nothing fits)."""
  for pattern, candidates in PARAM_RULES:
    if re.search(pattern, name):
      for spec in candidates:
        if _divides(spec, shape, mesh):
          return spec
      return P()
  return P()


def param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
  """A pytree of NamedSharding, like `params` (arrays or jax.ShapeDtypeStruct leaves)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: NamedSharding(mesh, param_spec(path_name(path), tuple(x.shape), mesh)), params
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch-major arrays ([B, ...]) split along 'data' and 'fsdp', replicated along 'model'."""
  return NamedSharding(mesh, P(BATCH_AXES))


def assert_big_tensors_sharded(params: PyTree, mesh: Mesh, min_size: int = 2**20) -> None:
  """Raise if a parameter with >= min_size elements is replicated over the 'model' axis.

  A start-up check that the rule table still matches the parameter names: a renamed
  module would otherwise silently replicate a large tensor on every device. Nothing is
  checked when the 'model' axis has size 1.
  """
  if mesh.shape[MODEL] == 1:
    return
  offenders = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if x.size < min_size:
      continue
    sharding = getattr(x, 'sharding', None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else None
    used = {
      a
      for axes in (spec or ())
      if axes is not None
      for a in (axes if isinstance(axes, tuple) else (axes,))
    }
    if MODEL not in used:
      offenders.append(f'{path_name(path)} {tuple(x.shape)} spec={spec}')
  if offenders:
    raise AssertionError(
      f'{len(offenders)} parameter(s) of >= {min_size} elements are not sharded over '
      f"'{MODEL}' (add a rule to sharding.PARAM_RULES or make the dimension divisible by "
      f'{mesh.shape[MODEL]}): ' + '; '.join(offenders)
    )
