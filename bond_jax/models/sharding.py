"""Sharding policy, in one place: a mesh, a rule table for parameters, a check.

The mesh has three axes:

  'data'   the batch is split over it; parameters are replicated along it
  'fsdp'   the batch is split over it too, and every large parameter is split over
           it (fully sharded data parallel: XLA gathers a parameter where it is used)
  'model'  tensor parallelism: heads, MLP width and vocabulary are split over it

Each parameter is matched, by its '/'-joined path (e.g. 'layer_3/attn/q_proj/kernel'),
against `PARAM_RULES`; the first rule whose regex matches gives an ordered list of
candidate PartitionSpecs, and the first candidate whose sharded dimensions divide evenly
by the mesh axis sizes is used. A rule names the dimension 'model' splits (heads, F, V)
and the one 'fsdp' splits (the model width D); its fallbacks, in order: both axes on the
fsdp dimension (e.g. a single key/value head under multi-query attention), both on the
model dimension, each axis alone, and finally replicated. So any mesh works, and an axis
of size 1 divides everything. Anything no rule matches (norm scales, small biases,
scalars) is replicated.

A scan over layers stacks each layer parameter on a leading axis ('layers/attn/...',
[L, ...]); that axis stays whole and the rules place the rest.

Rules match path suffixes, so one table covers every tree that holds a model: the
policy, the anchor and pi_ref in the TrainState ('params/...', 'anchor_params/...',
'ref_params/...'), Adam's moments ('opt_state/.../mu/<parameter path>', 'nu'), the reward
model and the learned quantile model ('decoder/<parameter path>', 'score/kernel').

Activations follow the batch, split over 'data' and 'fsdp' (`data_sharding`). Where XLA's
propagation from the inputs picks another layout, `constrain_batch` (rows) and
`gather_fsdp` (a parameter gathered before its use) state it, inside a function traced
under `jax.set_mesh(mesh)`; outside one they do nothing.

Typical use, so that parameters are born sharded:

  mesh = make_mesh(data=1, fsdp=-1, model=1)
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
PARAM_AXES = (FSDP, MODEL)  # the axes parameters are split over


def _split(ndim: int, model_dim: int, fsdp_dim: int | None) -> tuple[P, ...]:
  """Candidates for a tensor whose `model_dim` is split over 'model' and `fsdp_dim` over
  'fsdp', then the fallbacks (see the module docstring); fsdp_dim None: 'model' only."""

  def spec(*placed: tuple[int, Any]) -> P:
    dims: list[Any] = [None] * ndim
    for dim, axes in placed:
      dims[dim] = axes
    return P(*dims)

  if fsdp_dim is None:
    return (spec((model_dim, MODEL)),)
  both = (FSDP, MODEL)
  return (
    spec((model_dim, MODEL), (fsdp_dim, FSDP)),
    spec((fsdp_dim, both)),  # the model dimension does not divide: both on the fsdp one
    spec((model_dim, both)),  # the fsdp dimension does not divide: both on the model one
    spec((model_dim, MODEL)),
    spec((fsdp_dim, FSDP)),
    spec((fsdp_dim, MODEL)),
    spec((model_dim, FSDP)),
  )


# (path regex, candidate specs in order of preference). Shapes follow decoder.py and
# reward_model.py: embedding [V, D], q/k/v kernels [D, N|K, H] and biases [N|K, H], o_proj
# kernel [N, H, D], MLP gate/up [D, F] and down [F, D], lm_head [D, V], score head [D, 1].
PARAM_RULES: tuple[tuple[str, tuple[P, ...]], ...] = (
  (r'embedder/embedding$', _split(2, model_dim=0, fsdp_dim=1)),  # V over model, D over fsdp
  (r'attn/[qkv]_proj/kernel$', _split(3, model_dim=1, fsdp_dim=0)),  # heads / D
  (r'attn/[qkv]_proj/bias$', _split(2, model_dim=0, fsdp_dim=None)),  # heads (small)
  (r'attn/o_proj/kernel$', _split(3, model_dim=0, fsdp_dim=2)),  # heads / D
  (r'mlp/(gate|up)_proj/kernel$', _split(2, model_dim=1, fsdp_dim=0)),  # F / D
  (r'mlp/down_proj/kernel$', _split(2, model_dim=0, fsdp_dim=1)),  # F / D
  (r'lm_head/kernel$', _split(2, model_dim=1, fsdp_dim=0)),  # V / D
  (r'score/kernel$', (P(FSDP, None),)),  # reward / quantile model head [D, 1]: D over fsdp
  (r'norm/scale$', (P(),)),  # norms (and q/k norms) replicated
  # LoRA adapters (`lora.py`), small: a [*in, r] split over 'fsdp' on its input dimension
  # (D, or F for down_proj) where it divides, b [r, *out] on its first output dimension.
  (r'_lora/a$', (P(FSDP), P())),
  (r'_lora/b$', (P(None, FSDP), P())),
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


_STACKED = re.compile(r'(^|/)layers/')


def stacked(name: str) -> bool:
  """Whether parameter `name` belongs to a scan over layers ('layers/...', or
  'decoder/layers/...' in a reward or quantile model): its first axis is the layer."""
  return bool(_STACKED.search(name))


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of one parameter under `PARAM_RULES` (replicated when nothing fits).
  A scanned layer's leading layer axis is never split (each step of the scan reads one
  layer whole); the rules apply to the rest of its shape."""
  if stacked(name) and shape:
    return P(None, *param_spec(_STACKED.sub(r'\1', name, count=1), shape[1:], mesh))
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


def _context_mesh() -> Any:
  """The mesh of the enclosing `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain_batch(tree: PyTree) -> PyTree:
  """Each array of `tree` constrained to rows split over 'data' and 'fsdp', its other
  dimensions left to XLA (unconstrained, e.g. a vocabulary split over 'model').

  For activations inside a jitted function traced under `jax.set_mesh(mesh)`, where XLA's
  propagation could pick another layout (a freshly created buffer, a loop carry). A no-op
  outside a mesh context, for a mesh without the batch axes, and for an array whose leading
  dimension the batch axes do not divide (or a scalar).
  """
  mesh = _context_mesh()
  if mesh is None or not set(BATCH_AXES) <= set(mesh.axis_names):
    return tree
  ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

  def constrain(x: Any) -> Any:
    if x.ndim == 0 or x.shape[0] % ways:
      return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *[P.UNCONSTRAINED] * (x.ndim - 1)))

  return jax.tree.map(constrain, tree)


def gather_fsdp(x: jax.Array, name: str) -> jax.Array:
  """Parameter `x` (path `name`, e.g. 'embedder/embedding') constrained to its rule's spec
  without 'fsdp': the all-gather FSDP does before a use, stated where XLA would otherwise
  move activations instead (an embedding lookup: gathering rows of a table split over D
  makes XLA replicate the looked-up activations). A no-op outside a mesh context.
  """
  mesh = _context_mesh()
  if mesh is None or FSDP not in mesh.axis_names:
    return x
  dims = []
  for axes in param_spec(name, tuple(x.shape), mesh):
    kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a not in (FSDP, None))
    dims.append(kept[0] if len(kept) == 1 else (kept or None))
  return jax.lax.with_sharding_constraint(x, P(*dims))


def assert_big_tensors_sharded(params: PyTree, mesh: Mesh, min_size: int = 2**20) -> None:
  """Raise if a parameter with >= min_size elements is split over none of the parameter
  axes ('fsdp', 'model') that have more than one device.

  A start-up check that the rule table still matches the parameter names: a renamed
  module would otherwise silently replicate a large tensor on every device. Nothing is
  checked when both axes have size 1.
  """
  axes = [a for a in PARAM_AXES if mesh.shape.get(a, 1) > 1]
  if not axes:
    return
  offenders = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if x.size < min_size:
      continue
    sharding = getattr(x, 'sharding', None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else None
    used = {
      a
      for dim_axes in (spec or ())
      if dim_axes is not None and dim_axes is not P.UNCONSTRAINED
      for a in (dim_axes if isinstance(dim_axes, tuple) else (dim_axes,))
    }
    if not used & set(axes):
      offenders.append(f'{path_name(path)} {tuple(x.shape)} spec={spec}')
  if offenders:
    sizes = ', '.join(f"'{a}'={mesh.shape[a]}" for a in axes)
    raise AssertionError(
      f'{len(offenders)} parameter(s) of >= {min_size} elements are split over none of the '
      f'mesh axes {sizes} (add a rule to sharding.PARAM_RULES or make a dimension divisible '
      'by an axis size): ' + '; '.join(offenders)
    )
