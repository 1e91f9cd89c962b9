"""Per-device memory of the configured train step, planned before any hardware is used.

The planner compiles the very step the loop runs (`run.setup.jit_train_step`: the state
sharded by `models.sharding.param_shardings` and donated, prompts split over the batch
axes, the reward model's parameters where they are placed) from shapes alone: the model's
architecture comes from the config's preset, or from the config.json of
model.hf_checkpoint / reward.checkpoint when they are set; no weights are read and
nothing is allocated. XLA's memory analysis of the compiled program then says what each
device holds.

Targets: `plan_targets.py`. The report: `plan_report.py`.

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
from bond_jax.models import hf_config, reward_model, sharding
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup
from bond_jax.run.guards import RunError
from bond_jax.run.plan_targets import GIB, Target, local_target, target_devices
from bond_jax.types import ConfigError, PyTree, parameter_free

# The CPU compiler's widening of bfloat16, measured on one matmul pair (`calibration`).
CALIBRATION_SHAPES = ((4096, 2048), (2048, 16384))


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
    return hf_config.config_from_hf(hf_config.read_hf_config(r.checkpoint), r.dtype)
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
