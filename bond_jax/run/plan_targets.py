"""What a memory plan is for: targets (TPU topologies, N GPUs) and their devices.

Targets (`parse_target`):

  v5e:2x4, v5p:2x2x2, v4:2x2x1, ...  a TPU topology, compiled by the TPU compiler itself
                                     (libtpu, requirements-tpu.txt) on this CPU machine
                                     through `jax.experimental.topologies`; a plan that does
                                     not fit fails to compile (CompileTimeHbmOom), which is
                                     reported, not raised
  gpu:N, gpu:N:h200                  N fake CPU devices (JAX's CPU compiler; it widens
                                     bfloat16 to float32, so its temporaries overstate a
                                     GPU's), against N x H100 80 GB (or H200 141 GB)
  gpu:N with gpu_compiler='tpu'      the same GPUs, the program compiled by the TPU compiler
                                     for N TPU v5p chips (95 GiB each) as a stand-in for
                                     XLA's GPU compiler, which needs a GPU to run: like it,
                                     and unlike the CPU one, it computes in bfloat16 and
                                     schedules for memory. Neither is the GPU's own figure.
  gpu:N with gpu_compiler='gpu'      XLA's GPU compiler itself, the GPU's own figure: on this
                                     machine's GPUs when it has N of the target's kind, else
                                     ahead of time for N such GPUs described to JAX's CUDA
                                     plugin (`gpu_target_config`; no GPU needed, a CPU-only
                                     machine with requirements-gpu.txt will do). Deviceless
                                     compiles skip autotuning: a GPU's autotuned kernels may
                                     take a little more scratch space.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

GIB = 2**30
MIB = 2**20

# HBM per chip of each TPU generation (GiB), and the name JAX's device_kind gives it.
TPU_MEMORY_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
TPU_KINDS = {
  'TPU v4': 'v4',
  'TPU v5 lite': 'v5e',
  'TPU v5': 'v5p',
  'TPU v5p': 'v5p',
  'TPU v6 lite': 'v6e',
}
# Memory of each GPU as nvidia-smi reports it (MiB): 'H100 80 GB' is 79.6 GiB.
GPU_MEMORY_MIB = {'h100': 81_559, 'h200': 143_771}
GPU_LABELS = {'h100': 'H100 80 GB', 'h200': 'H200 141 GB'}
# What XLA's GPU compiler is told about each GPU when it compiles without one (SXM parts,
# from NVIDIA's Hopper datasheets): both are the same Hopper chip (compute capability 9.0,
# 132 multiprocessors); the H200 has more and faster memory. device_kind is what JAX names
# the attached GPU, so a local GPU of the target's kind is recognised.
GPU_CHIPS = {
  'h100': {'device_kind': 'NVIDIA H100 80GB HBM3', 'bandwidth': 3.35e12},
  'h200': {'device_kind': 'NVIDIA H200', 'bandwidth': 4.8e12},
}

TARGET_FORMS = (
  'a TPU topology such as v5e:2x4, v5e:4x4, v5e:4x8 or v5p:2x2x2 (generations '
  f'{", ".join(sorted(TPU_MEMORY_GIB))}), or gpu:N (N x H100 80 GB) / gpu:N:h200'
)
TPU_PATTERN = re.compile(r'^(v\d+[a-z]*):(\d+(?:x\d+)+)$')
GPU_PATTERN = re.compile(r'^gpu:(\d+)(?::([a-z0-9]+))?$')


class TargetError(ValueError):
  """A --target the planner cannot compile for; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Target:
  """What the step is compiled for: a TPU topology or N GPUs (compiled as fake CPU devices)."""

  name: str  # as given, e.g. 'v5e:2x4' or 'gpu:8'
  kind: str  # 'tpu' | 'gpu'
  num_devices: int
  device_memory_bytes: int
  device_label: str  # 'TPU v5e', 'H100 80 GB'
  compile_with: str = 'cpu'  # a gpu:N target's compiler: 'cpu' | 'tpu' (stand-ins) | 'gpu'
  gpu_model: str = 'h100'  # a gpu:N target's chip, a key of GPU_CHIPS

  @property
  def compiler(self) -> str:
    if self.kind == 'tpu':
      return 'the TPU compiler (libtpu)'
    if self.compile_with == 'gpu':
      where = 'local' if local_gpus(self) else 'described (deviceless: no GPU used)'
      return f"XLA's GPU compiler for {self.num_devices} {where} {self.device_label} GPU(s)"
    if self.compile_with == 'tpu':
      return (
        f'the TPU compiler (libtpu) for {self.num_devices} TPU v5p chip(s) '
        f"({stand_in_topology(self.num_devices)}), a stand-in for XLA's GPU compiler"
      )
    return f"JAX's CPU compiler on {self.num_devices} fake CPU device(s)"


# v5p topologies of N chips, for a GPU target compiled by the TPU compiler.
_V5P_TOPOLOGIES = {1: '1x1x1', 2: '1x2x1', 4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4'}


def stand_in_topology(num_devices: int) -> str:
  """The TPU v5p topology with `num_devices` chips that stands in for that many GPUs."""
  if num_devices not in _V5P_TOPOLOGIES:
    raise TargetError(
      f'--gpu_compiler=tpu plans 1, 2, 4, 8, 16 or 32 GPUs, not {num_devices}; use '
      '--gpu_compiler=cpu for other counts.'
    )
  return f'v5p:{_V5P_TOPOLOGIES[num_devices]}'


def parse_target(
  text: str, gpu_memory_gib: float | None = None, gpu_compiler: str = 'cpu'
) -> Target:
  """The target named by --target (forms in TARGET_FORMS); one-line TargetError otherwise.
  gpu_compiler: how a gpu:N target is compiled, 'cpu' (fake CPU devices), 'tpu' (the
  TPU compiler for as many v5p chips) or 'gpu' (this machine's GPUs); see the module
  docstring."""
  text = (text or '').strip()
  if gpu_compiler not in ('cpu', 'tpu', 'gpu'):
    raise TargetError(f"--gpu_compiler={gpu_compiler!r} is invalid: give 'cpu', 'tpu' or 'gpu'.")
  tpu, gpu = TPU_PATTERN.match(text.lower()), GPU_PATTERN.match(text.lower())
  if tpu:
    generation, dims = tpu.group(1), tpu.group(2)
    if generation not in TPU_MEMORY_GIB:
      raise TargetError(
        f'--target={text!r}: no memory figure for TPU generation {generation!r}; use one of '
        f'{", ".join(sorted(TPU_MEMORY_GIB))} (accepted forms: {TARGET_FORMS}).'
      )
    if gpu_memory_gib is not None:
      raise TargetError(f'--gpu_memory_gib applies to gpu:N targets, not --target={text!r}.')
    if gpu_compiler != 'cpu':
      raise TargetError(f'--gpu_compiler applies to gpu:N targets, not --target={text!r}.')
    n = math.prod(int(d) for d in dims.split('x'))
    return Target(text, 'tpu', n, TPU_MEMORY_GIB[generation] * GIB, f'TPU {generation}')
  if gpu and int(gpu.group(1)) > 0:
    model = gpu.group(2) or 'h100'
    if model not in GPU_MEMORY_MIB:
      raise TargetError(
        f'--target={text!r}: unknown GPU {model!r}; use one of {sorted(GPU_MEMORY_MIB)} or '
        'give its memory with --gpu_memory_gib.'
      )
    memory, label = GPU_MEMORY_MIB[model] * MIB, GPU_LABELS[model]
    if gpu_memory_gib is not None:
      if not gpu_memory_gib > 0:
        raise TargetError(f'--gpu_memory_gib={gpu_memory_gib}: give the memory per GPU, > 0.')
      memory, label = int(gpu_memory_gib * GIB), f'GPU of {gpu_memory_gib:g} GiB'
    n = int(gpu.group(1))
    if gpu_compiler == 'tpu':
      stand_in_topology(n)  # a one-line error now for a count with no v5p topology
    return Target(text, 'gpu', n, memory, label, compile_with=gpu_compiler, gpu_model=model)
  raise TargetError(f'--target={text!r} is invalid: give {TARGET_FORMS}.')


def target_devices(target: Target) -> list[Any]:
  """The devices the step is compiled for: the topology's TPUs, or N CPU devices (JAX's
  device count is fixed when its backend starts, so a gpu:N plan sets it first)."""
  if target.compile_with == 'gpu':
    return local_gpus(target) or described_gpus(target)
  if target.kind == 'tpu' or target.compile_with == 'tpu':
    try:
      import libtpu  # noqa: F401 (only to say what is missing)
    except ImportError:
      raise TargetError(
        f'--target={target.name}: the TPU compiler is needed: '
        'pip install -r requirements-tpu.txt (libtpu; no TPU needed).'
      ) from None
    from jax.experimental import topologies

    name = target.name.lower() if target.kind == 'tpu' else stand_in_topology(target.num_devices)
    try:
      topology = topologies.get_topology_desc(topology_name=name, platform='tpu')
    except Exception as e:  # noqa: BLE001 (libtpu raises XlaRuntimeError / ValueError)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise TargetError(f'--target={target.name}: libtpu does not know it ({first}).') from e
    return list(topology.devices)
  try:
    jax.config.update('jax_num_cpu_devices', target.num_devices)
  except RuntimeError:
    pass  # the backend has started: enough devices may exist already
  devices = jax.devices('cpu')
  if len(devices) < target.num_devices:
    raise TargetError(
      f'--target={target.name}: JAX started with {len(devices)} CPU device(s); plan in a fresh '
      f"process (scripts/memory_plan.py), or call jax.config.update('jax_num_cpu_devices', "
      f'{target.num_devices}) before JAX runs anything.'
    )
  return devices[: target.num_devices]


def has_cuda_plugin() -> bool:
  """Whether JAX's CUDA plugin is installed (it compiles for GPUs with or without one)."""
  from importlib import metadata  # noqa: PLC0415

  for version in (12, 13):
    try:
      metadata.version(f'jax-cuda{version}-plugin')
      return True
    except metadata.PackageNotFoundError:
      pass
  return False


def local_gpus(target: Target) -> list[Any]:
  """N attached GPUs of the target's kind and memory, or [] (then the plan is deviceless).
  Only looks when JAX may use a GPU (scripts/memory_plan.py keeps it on the CPU otherwise)."""
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    return []
  try:
    gpus = jax.devices('gpu')
  except RuntimeError:
    return []
  kind = GPU_CHIPS[target.gpu_model]['device_kind']
  same = [d for d in gpus if d.device_kind == kind]
  if len(same) < target.num_devices or target.device_label not in GPU_LABELS.values():
    return []
  return same[: target.num_devices]


def gpu_target_config(target: Target) -> str:
  """The description of one of the target's GPUs that XLA's GPU compiler reads in place of
  an attached device (a GpuTargetConfigProto in text form), its memory the target's."""
  chip = GPU_CHIPS[target.gpu_model]
  fields = {  # Hopper (compute capability 9.0), per multiprocessor unless it says block
    'threads_per_block_limit': 1024,
    'threads_per_warp': 32,
    'shared_memory_per_block': 48 * 1024,
    'shared_memory_per_block_optin': 227 * 1024,
    'shared_memory_per_core': 228 * 1024,
    'threads_per_core_limit': 2048,
    'core_count': 132,
    'fpus_per_core': 128,
    'block_dim_limit_x': 2**31 - 1,
    'block_dim_limit_y': 65535,
    'block_dim_limit_z': 65535,
    'memory_bandwidth': int(chip['bandwidth']),
    'l2_cache_size': 50 * 2**20,
    'clock_rate_ghz': 1.98,
    'device_memory_size': target.device_memory_bytes,
    'registers_per_core_limit': 65536,
    'registers_per_block_limit': 65536,
  }
  body = '\n'.join(f'  {k}: {v}' for k, v in fields.items())
  return (
    f'gpu_device_info {{\n{body}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n'
    f'platform_name: "CUDA"\ndevice_description_str: "{chip["device_kind"]}"\n'
  )


def described_gpus(target: Target) -> list[Any]:
  """N compile-only GPUs of the target's kind from JAX's CUDA plugin (no GPU needed); a
  one-line TargetError when the plugin is missing or refuses the count."""
  from jax.experimental import topologies  # noqa: PLC0415

  n = target.num_devices
  if n > 8 and n % 8:
    raise TargetError(f'--target={target.name}: plan 1 to 8 GPUs, or a multiple of 8 (hosts of 8).')
  hosts, per_host = (n // 8, 8) if n > 8 else (1, n)
  try:
    topology = topologies.get_topology_desc(
      'bond_jax', 'cuda', target_config=gpu_target_config(target), topology=f'1x{hosts}x{per_host}'
    )
  except (NotImplementedError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = 'pip install -r requirements-gpu.txt'
    if has_cuda_plugin():  # installed, but it registers on a GPU-less machine only so
      hint = 'run with JAX_PLATFORMS=cpu (scripts/memory_plan.py does)'
    raise TargetError(
      f"--target={target.name} --gpu_compiler=gpu needs JAX's CUDA plugin (no GPU needed): "
      f'{hint} ({first}).'
    ) from e
  return list(topology.devices)[:n]


def local_target(devices: Sequence[Any]) -> str:
  """The --target naming `devices`: a TPU topology from their kind and coordinates, or
  gpu:N; '' when it cannot be told."""
  first = devices[0]
  if first.platform == 'tpu':
    generation = TPU_KINDS.get(first.device_kind)
    coords = [getattr(d, 'coords', None) for d in devices]
    if generation is None or any(c is None for c in coords):
      return ''
    bounds = [max(c[i] for c in coords) + 1 for i in range(len(coords[0]))]
    while len(bounds) > 2 and bounds[-1] == 1:
      bounds.pop()
    return f'{generation}:{"x".join(map(str, bounds))}'
  if first.platform == 'gpu':
    return f'gpu:{len(devices)}'
  return ''
