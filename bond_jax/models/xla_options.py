"""XLA compiler options this codebase compiles with, chosen by the platform compiled for.

They go to `jax.jit(..., compiler_options=...)`, so only the functions built here take them;
no environment variable (`XLA_FLAGS`) is read or written, and a compile for another platform
(a TPU or GPU plan made on a CPU host, `run/memory_plan.py`) gets none of the CPU's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

CPU_OPTIONS: dict[str, Any] = {
  # XLA:CPU's copy insertion, analysing a while loop's body as a region, proves that the
  # decode loop's carried KV cache can be updated in place (given that a decode step writes
  # the cache after its reads: `attention.Attention`). Without it every cache array is copied
  # two or three times a step (docs/BENCHMARKS.md, "Why the code is shaped as it is").
  'xla_cpu_copy_insertion_use_region_analysis': True,
}


def compiler_options(platform: str | None = None) -> dict[str, Any]:
  """The options for a compile on `platform` ('cpu', 'gpu', 'tpu'; None: JAX's default
  backend): `CPU_OPTIONS` for the CPU, none elsewhere."""
  platform = platform or jax.default_backend()
  return dict(CPU_OPTIONS) if platform == 'cpu' else {}


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
  """The platform of a mesh's devices (abstract TPU topologies included)."""
  return mesh.devices.flat[0].platform


class DefaultBackendJit:
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options` for JAX's default backend, made on
  the first call (not at import, so that importing a module defining one does not start a
  backend). Call it as the jitted function; `lower` lowers."""

  def __init__(self, fun: Callable[..., Any], **jit_kwargs: Any):
    self._fun, self._kwargs = fun, jit_kwargs
    functools.update_wrapper(self, fun)

  @functools.cached_property
  def jitted(self) -> Any:
    return jax.jit(self._fun, **self._kwargs, compiler_options=compiler_options())

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.jitted(*args, **kwargs)

  def lower(self, *args: Any, **kwargs: Any) -> Any:
    return self.jitted.lower(*args, **kwargs)
