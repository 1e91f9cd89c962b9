"""Per-device memory of the configured train step, planned before any hardware is used.

The planner compiles the very step the loop runs (`run.setup.jit_train_step`: the state
sharded by `models.sharding.param_shardings` and donated, prompts split over the batch
axes, the reward model's parameters where they are placed) from shapes alone: the model's
architecture comes from the config's preset, or from the config.json of
model.hf_checkpoint / reward.checkpoint when they are set; no weights are read and
nothing is allocated. XLA's memory analysis of the compiled program then says what each
device holds.

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

Peak per device = arguments + outputs - outputs aliased to donated arguments +
temporaries (the donated state's new value reuses the old one's buffers), as maxtext's
train_compile.py counts it, + the program's code (a few MiB on TPU, 0 on CPU).

At start-up on real hardware the loop can compile the step once through `fit_or_stop`,
which stops with one line naming the peak, the device's memory and the planner command
when the step does not fit (`check_fits`); on CPU it changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond_jax.data import rewards
from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import hf, reward_model, sharding
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.run.guards import RunError
from bond_jax.types import ConfigError, PyTree, parameter_free

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
# The CPU compiler's widening of bfloat16, measured on one matmul pair (`calibration`).
CALIBRATION_SHAPES = ((4096, 2048), (2048, 16384))


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


# ---------------------------------------------------------------------------
# The run's static pieces from shapes only.


def _reward_config(
  c: ml_collections.ConfigDict, policy: model_lib.ModelConfig
) -> model_lib.ModelConfig:
  """The reward model's architecture: reward.checkpoint's config.json, else the policy's
  own shapes; weights and activations in reward.dtype (as `hf.load_reward_params`)."""
  r = c.reward
  if r.dtype not in config_lib.DTYPES:
    raise ConfigError(f'config.reward.dtype={r.dtype!r} is invalid: one of {config_lib.DTYPES}.')
  if not r.checkpoint:  # laid out as `hf.load_reward_params` builds it: unrolled, no remat
    return dataclasses.replace(
      policy, dtype=r.dtype, param_dtype=r.dtype, remat='none', scan_layers=False
    )
  try:
    return hf.config_from_hf(hf.read_hf_config(r.checkpoint), r.dtype)
  except (OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0]
    raise ConfigError(
      f'config.reward.checkpoint={r.checkpoint!r} is invalid: {first} (its config.json gives '
      "the reward model's shapes; '' plans a reward model of the policy's size)."
    ) from e


def _reward(
  c: ml_collections.ConfigDict, policy: model_lib.ModelConfig, mesh: jax.sharding.Mesh
) -> tuple[Any, PyTree]:
  """(reward_fn, the reward model's abstract parameters placed on `mesh`, or None)."""
  if c.task.name != 'hf':
    return parameter_free(config_lib.task(c, policy).reward), None
  r = c.reward
  if r.source == 'python':  # runs on the host: nothing on the devices but one float per row
    return functools.partial(rewards.PROGRAMMATIC['length_penalty'], None), None
  if r.source == 'programmatic':
    if r.fn not in rewards.PROGRAMMATIC:
      raise ConfigError(
        f'config.reward.fn={r.fn!r} is invalid: one of {sorted(rewards.PROGRAMMATIC)}.'
      )
    sp = config_lib.sampling_params(c)
    ids = tokenizer_lib.SpecialIds(eos_id=sp.eos_id, pad_id=sp.pad_id, bos_id=None, add_bos=False)
    return functools.partial(rewards.PROGRAMMATIC[r.fn], ids), None
  if r.source != 'model':
    raise ConfigError(
      f'config.reward.source={r.source!r} is invalid: one of {config_lib.REWARD_SOURCES}.'
    )
  cfg = _reward_config(c, policy)
  shapes = jax.eval_shape(lambda: reward_model.init_params(cfg, jax.random.key(0)))
  placed = with_shardings(shapes, sharding.param_shardings(shapes, mesh))
  # The same-vocabulary path (the policy's ids read as they are); `plan` notes when
  # reward.tokenizer_path asks for re-tokenization instead.
  return functools.partial(reward_model.score_responses, cfg), placed


def _policy_config(c: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  if c.task.name == 'hf' and c.model.hf_checkpoint:
    if not (Path(c.model.hf_checkpoint) / 'config.json').is_file():
      raise ConfigError(
        f'config.model.hf_checkpoint={c.model.hf_checkpoint!r} is invalid: no config.json '
        "there (the planner reads only that; '' plans model.preset's shapes)."
      )
  return config_lib.model_config(c)


def plan_setup(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run_setup.RunSetup:
  """A RunSetup built from shapes only: the loop's step config and optimizer, the reward
  model's abstract parameters as `reward_params`; no prompts, evaluation or reference."""
  cfg = _policy_config(c)
  reward_fn, reward_params = _reward(c, cfg, mesh)
  step_cfg = config_lib.step_config(c, cfg, reward_fn, config_lib.sampling_params(c))
  tx, schedule = run_setup.optimizer(c)
  known = dict(
    cfg=cfg,
    step_cfg=step_cfg,
    tx=tx,
    schedule=schedule,
    reward_params=reward_params,
    ref_dtype=config_lib.memory_dtype(c, 'model.reference_dtype'),
  )
  rest = {f.name: None for f in dataclasses.fields(run_setup.RunSetup) if f.name not in known}
  return run_setup.RunSetup(**known, **rest)


def prompt_shape(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig) -> tuple[int, int]:
  """(B, P) of the widest global prompt batch the loop feeds: with data.prompt_bucket a
  batch of short prompts is padded to fewer than data.max_prompt_len tokens, and compiles
  its own, smaller, step."""
  if c.task.name == 'hf':
    return c.train.batch_size, c.data.max_prompt_len
  task = config_lib.task(c, cfg)
  shape = jax.eval_shape(lambda: task.prompts(jax.random.key(0), c.train.batch_size))[0].shape
  return tuple(shape)


def _check_config(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """What `config.validate` would say about the mesh and the batch on `num_devices`
  (validate itself also checks the checkpoint and data paths, which a plan does not need)."""
  shape = config_lib.mesh_shape(c, num_devices)
  config_lib.bond_config(c)
  batch = c.train.batch_size
  if not (isinstance(batch, int) and batch > 0 and batch % (shape[0] * shape[1]) == 0):
    raise ConfigError(
      f'config.train.batch_size={batch!r} is invalid: must be divisible by mesh.data * '
      f'mesh.fsdp = {shape[0] * shape[1]} on this target (prompts are split across them).'
    )
  return shape


# ---------------------------------------------------------------------------
# Bytes.


def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree` carrying `shardings` (what `.lower` is given)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def device_bytes(tree: PyTree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays): each leaf's
  shard shape times its item size (NamedShardings split evenly, so every device alike)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's memory analysis of a compiled step, per device (bytes)."""

  arguments: int
  outputs: int
  aliased: int  # outputs written into donated arguments' buffers
  temporaries: int
  generated_code: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> StepMemory:
    m = compiled.memory_analysis()
    return cls(
      arguments=int(m.argument_size_in_bytes),
      outputs=int(m.output_size_in_bytes),
      aliased=int(m.alias_size_in_bytes),
      temporaries=int(m.temp_size_in_bytes),
      generated_code=int(m.generated_code_size_in_bytes),
    )


@dataclasses.dataclass
class Plan:
  """A compiled plan's figures, per device."""

  target: Target
  mesh_shape: tuple[int, int, int]  # (data, fsdp, model)
  trees: dict[str, int]  # state tree (and 'reward_model', 'prompts') -> bytes per device
  memory: StepMemory | None  # None: the TPU compiler refused (see `error`)
  lower_s: float
  compile_s: float
  host_peak_bytes: int  # peak resident memory of this process so far
  error: str = ''  # the compiler's out-of-memory message
  required: int = 0  # what that message says the step needs in all, arguments included
  compiler_limit: int = 0  # the HBM the TPU compiler allows, from that message
  reward_note: str = ''
  compiled: Any = dataclasses.field(default=None, repr=False)  # the compiled step, if any

  @property
  def peak(self) -> int:
    if self.memory is not None:
      return self.memory.peak
    return self.required  # the compiler stopped: what it needed

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.peak <= self.target.device_memory_bytes

  def summary(self) -> dict[str, Any]:
    """The JSON object of the planner's last line."""
    gib = lambda b: round(b / GIB, 3)
    out = {
      'target': self.target.name,
      'compiler': 'tpu' if self.target.kind == 'tpu' else self.target.compile_with,
      'num_devices': self.target.num_devices,
      'mesh': dict(zip(('data', 'fsdp', 'model'), self.mesh_shape, strict=True)),
      'peak_gib_per_device': gib(self.peak),
      'device_memory_gib': gib(self.target.device_memory_bytes),
      'fits': self.fits,
      'trees_gib_per_device': {k: gib(v) for k, v in self.trees.items()},
      'trees_bytes_per_device': dict(self.trees),
      'peak_bytes_per_device': self.peak,
      'compile_s': round(self.lower_s + self.compile_s, 1),
      'host_peak_gib': gib(self.host_peak_bytes),
    }
    if self.memory is not None:
      m = self.memory
      out['xla_gib_per_device'] = {k: gib(v) for k, v in dataclasses.asdict(m).items()}
      out['xla_bytes_per_device'] = dataclasses.asdict(m)
    else:
      out['error'] = self.error
      out['xla_gib_per_device'] = {'required': gib(self.required)}
    return out


_OOM = re.compile(r'temporaries \(([\d.]+)([KMGT]?)\).*available HBM \(([\d.]+)([KMGT]?)\)', re.S)
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def parse_hbm_oom(message: str) -> tuple[int, int] | None:
  """(bytes needed, HBM available) from the TPU compiler's CompileTimeHbmOom message, or
  None for any other error. Its sizes are binary ('G' is GiB), and what it calls "HLO
  temporaries" includes the arguments: a sort of a 10 GiB argument (20 GiB of temporaries
  when it fits) is reported as 30.00G."""
  if 'CompileTimeHbmOom' not in message:
    return None
  m = _OOM.search(message)
  if not m:
    return 0, 0
  size = lambda value, unit: int(float(value) * _UNITS[unit])
  return size(m.group(1), m.group(2)), size(m.group(3), m.group(4))


def _host_peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _state_trees(state: Any) -> dict[str, PyTree]:
  """The TrainState's trees by name (the learned quantile model's two as one), step + rng
  as 'step_rng'; absent trees (None) left out."""
  trees: dict[str, PyTree] = {}
  small = []
  for field in dataclasses.fields(state):
    value = getattr(state, field.name)
    if value is None:
      continue
    if field.name.startswith('quantile_'):
      trees.setdefault('quantile_model', []).append(value)
    elif field.name in ('step', 'rng'):
      small.append(value)
    else:
      trees[field.name] = value
  trees['step_rng'] = small
  return trees


def plan(c: ml_collections.ConfigDict, target: Target) -> Plan:
  """Compile `c`'s train step for `target` from shapes only and measure it per device.

  A TPU compile that runs out of HBM gives a Plan with `error` set and `fits` False; other
  errors are raised.
  """
  devices = target_devices(target)
  shape = _check_config(c, len(devices))
  mesh = run_setup.make_mesh(c, devices=devices)
  setup = plan_setup(c, mesh)
  abstract = run_setup.abstract_state(setup)
  state_sharding = sharding.param_shardings(abstract, mesh)
  batch_sharding = sharding.data_sharding(mesh)
  state = with_shardings(abstract, state_sharding)
  b, p = prompt_shape(c, setup.cfg)
  prompt = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=batch_sharding)
  valid = jax.ShapeDtypeStruct((b, p), jnp.bool_, sharding=batch_sharding)
  trees = {name: device_bytes(t) for name, t in _state_trees(state).items()}
  if setup.reward_params is not None:
    trees['reward_model'] = device_bytes(setup.reward_params)
  trees['prompts'] = device_bytes((prompt, valid))
  step = run_setup.jit_train_step(setup, state_sharding, batch_sharding)
  t0 = time.time()
  lowered = step.lower(state, prompt, valid, setup.reward_params)
  t1 = time.time()
  note = ''
  if c.task.name == 'hf' and c.reward.source == 'model' and c.reward.tokenizer_path:
    note = (
      'reward.tokenizer_path is set: planned as if the reward model shared the policy '
      f'vocabulary (rows of P + G tokens, not reward.max_len={c.reward.max_len})'
    )
  common = dict(target=target, mesh_shape=shape, trees=trees, reward_note=note)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 (JaxRuntimeError; only the HBM refusal is a result)
    oom = parse_hbm_oom(str(e))
    if oom is None:
      raise
    first = str(e).strip().splitlines()[0]
    return Plan(
      **common, memory=None, lower_s=t1 - t0, compile_s=time.time() - t1,
      host_peak_bytes=_host_peak_bytes(), error=first, required=oom[0],
      compiler_limit=oom[1],
    )  # fmt: skip
  return Plan(
    **common, memory=StepMemory.of(compiled), lower_s=t1 - t0, compile_s=time.time() - t1,
    host_peak_bytes=_host_peak_bytes(), compiled=compiled,
  )  # fmt: skip


def calibration() -> tuple[int, int]:
  """Temporaries (bytes) the CPU compiler gives a [4096, 2048] x [2048, 16384] matmul and
  the product back with the same matrix, in bfloat16 and in float32: the first is larger,
  because the CPU compiler computes bfloat16 dots in float32 and keeps widened copies."""
  (m, k), (_, n) = CALIBRATION_SHAPES
  pair = jax.jit(lambda a_MxK, b_KxN: (a_MxK @ b_KxN) @ b_KxN.T)
  temps = []
  for dtype in (jnp.bfloat16, jnp.float32):
    compiled = pair.lower(
      jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), dtype)
    ).compile()
    temps.append(int(compiled.memory_analysis().temp_size_in_bytes))
  return temps[0], temps[1]


# ---------------------------------------------------------------------------
# The report.

TREE_LABELS = {
  'params': 'policy (params)',
  'anchor_params': 'anchor (anchor_params)',
  'ref_params': 'pi_ref (ref_params)',
  'opt_state': 'Adam state (opt_state)',
  'quantile_model': 'learned quantile model + its Adam state',
  'step_rng': 'step + rng',
  'reward_model': 'reward model',
  'prompts': 'prompt batch (ids + mask)',
}


def _size(n: int) -> str:
  return f'{n / GIB:9.2f} GiB' if n >= GIB // 10 else f'{n / MIB:9.2f} MiB'


def describe(
  result: Plan, config_label: str, calibration_bytes: tuple[int, int] | None = None
) -> list[str]:
  """The planner's report, line by line (the JSON line is `summary_line`)."""
  t = result.target
  memory = f'{t.device_memory_bytes / GIB:.2f} GiB'
  data, fsdp, model = result.mesh_shape
  row = lambda label, n: f'  {label:56s}{_size(n)}'
  lines = [
    f'memory plan of {config_label} on {t.name}: {t.num_devices} x {t.device_label} '
    f'({memory} each), mesh data={data} fsdp={fsdp} model={model}, compiled by {t.compiler}',
    'per device:',
  ]
  lines += [row(TREE_LABELS.get(name, name), n) for name, n in result.trees.items()]
  lines.append(row('= arguments, counted from the shardings', sum(result.trees.values())))
  if result.memory is not None:
    m = result.memory
    lines += [
      row('XLA arguments', m.arguments),
      row('XLA outputs', m.outputs),
      row('XLA aliased (outputs written into donated inputs)', m.aliased),
      row('XLA temporaries', m.temporaries),
      row('XLA generated code', m.generated_code),
      row('peak = arguments + outputs - aliased + temps + code', result.peak)
      + f' of {memory}: '
      + ('fits' if result.fits else 'DOES NOT FIT'),
    ]
  else:
    lines += [
      f'  the TPU compiler refused: {result.error}',
      row('peak = what the compiler needed (arguments included)', result.peak)
      + f' of {memory} (the compiler allows {result.compiler_limit / GIB:.2f}): DOES NOT FIT',
    ]
  if t.kind == 'gpu' and t.compile_with == 'tpu':
    lines.append(
      '  note: compiled for TPU v5p chips as a stand-in (bfloat16 computed as such, a '
      'memory-aware schedule, as XLA:GPU does); TPU tiling pads small dimensions, and the '
      "GPU compiler's own choices differ: not a GPU measurement. --gpu_compiler=cpu gives "
      "the CPU compiler's (higher) figure."
    )
  elif t.kind == 'gpu' and t.compile_with == 'gpu' and not local_gpus(t):
    lines.append(
      "  note: XLA's GPU compiler, deviceless (the GPU described to JAX's CUDA plugin); "
      'it skips autotuning, whose kernels may take a little more scratch space on the GPU.'
    )
  elif t.kind == 'gpu' and t.compile_with == 'cpu':
    lines.append(
      "  note: JAX's CPU compiler widens bfloat16 to float32 (dots and their operands), so "
      "these temporaries overstate a GPU's; the arguments are exact."
    )
    if calibration_bytes is not None:
      (m_, k_), (_, n_) = CALIBRATION_SHAPES
      lines.append(
        f'  calibration: a bfloat16 [{m_}, {k_}] x [{k_}, {n_}] matmul and back: '
        f'{calibration_bytes[0] / MIB:.0f} MiB of temporaries on CPU, against '
        f'{calibration_bytes[1] / MIB:.0f} MiB for the same program in float32 and the '
        f'{m_ * n_ * 2 / MIB:.0f} MiB bfloat16 product a GPU keeps'
      )
  if t.kind == 'gpu':
    lines.append(
      '  note: JAX on a GPU takes 75% of its memory by default; for a plan above that set '
      'XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.95).'
    )
  if result.reward_note:
    lines.append(f'  note: {result.reward_note}')
  lines.append(
    f'compile: lowered in {result.lower_s:.0f} s, compiled in {result.compile_s:.0f} s; '
    f'peak host RAM {result.host_peak_bytes / GIB:.1f} GiB'
  )
  return lines


# ---------------------------------------------------------------------------
# At start-up on real hardware.


def check_fits(
  compiled: jax.stages.Compiled, device_memory_bytes: int, planner_command: str
) -> StepMemory:
  """The compiled step's memory per device; RunError (one line: the peak, the device's
  memory, the planner command) when the peak exceeds `device_memory_bytes`."""
  memory = StepMemory.of(compiled)
  if memory.peak > device_memory_bytes:
    raise RunError(
      f'the train step needs {memory.peak / GIB:.2f} GiB per device (arguments '
      f'{memory.arguments / GIB:.2f}, temporaries {memory.temporaries / GIB:.2f}) but each '
      f'device has {device_memory_bytes / GIB:.2f} GiB: it will not fit; size the config '
      f'with {planner_command}'
    )
  return memory


def device_memory_bytes(device: Any) -> int | None:
  """The memory JAX may use on `device` (its allocator's limit), or None when unknown."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


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


def planner_command(
  config_file: str = '<your config file>', target: str = '', overrides: Sequence[str] = ()
) -> str:
  """The command that plans a config for a target, for messages."""
  words = ['python', 'scripts/memory_plan.py', f'--config={config_file}']
  words += [f'--target={target or "<target>"}', *overrides]
  return ' '.join(words)


def fit_or_stop(
  step_fn: Callable[..., Any], *args: Any, config_file: str = '<your config file>'
) -> Callable[..., Any]:
  """Compile `step_fn` (the jitted train step) for `args` (arrays or ShapeDtypeStructs with
  their shardings) once, and stop with a one-line RunError when it will not fit on this
  machine's accelerators: the TPU compiler's refusal, or a peak above the device's
  allocator limit (`check_fits`). Returns the compiled step, to be called in place of
  `step_fn` (no second compile). On CPU: `step_fn` itself, nothing compiled."""
  device = jax.devices()[0]
  if device.platform not in ('tpu', 'gpu'):
    return step_fn
  limit = device_memory_bytes(device)
  command = planner_command(config_file, local_target(jax.devices()))
  try:
    compiled = step_fn.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 (the TPU compiler refuses a step that cannot fit)
    oom = parse_hbm_oom(str(e))
    if oom is None:
      raise
    raise RunError(
      f'the train step needs {oom[0] / GIB:.2f} GiB per device but the TPU compiler allows '
      f'{oom[1] / GIB:.2f} GiB: it will not fit; size the config with {command}'
    ) from e
  if limit is not None:
    check_fits(compiled, limit, command)
  return compiled
