"""What a script's process runs on: the platform (`cpu_unless_accelerators`), and joining a
multi-process run (the flags scripts/train.py, evaluate.py and export_hf.py share).

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit (any cluster)
  --distributed                          JAX finds them itself (TPU pod slices, SLURM, Open MPI)
  JAX_COORDINATOR_ADDRESS, or SLURM / Open MPI with more than one task   the same, unasked

Each process runs the same command; `jax.distributed.initialize` joins them
(`guards.start_processes`), after which only process 0 prints to stdout.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping

from absl import flags

from bond_jax.run import guards

# Device files of the accelerators JAX's plugins look for: NVIDIA GPUs, TPU VMs.
ACCELERATOR_FILES = ('/dev/nvidiactl', '/dev/nvidia0', '/dev/accel0', '/dev/vfio')


def pins_cpu(environ: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists) -> bool:
  """Whether a process should keep JAX to the CPU: no JAX_PLATFORMS of its own and none of
  ACCELERATOR_FILES on the machine."""
  return not environ.get('JAX_PLATFORMS') and not any(exists(f) for f in ACCELERATOR_FILES)


def cpu_unless_accelerators() -> bool:
  """On a machine without a GPU or TPU, keep JAX to the CPU (before its backends start).
  With the optional CUDA plugin or libtpu installed (requirements-gpu.txt, -tpu.txt, which
  the memory planner uses on any machine), JAX would otherwise try them first and print
  their failures, tracebacks included, before it falls back to the CPU. JAX_PLATFORMS, when
  set, decides instead. True when it chose the CPU."""
  if not pins_cpu(os.environ):
    return False
  import jax  # noqa: PLC0415 (jax reads JAX_PLATFORMS when imported: set its config instead)

  jax.config.update('jax_platforms', 'cpu')
  return True


@dataclasses.dataclass(frozen=True)
class ProcessFlags:
  coordinator_address: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder
  distributed: flags.FlagHolder


def define_flags() -> ProcessFlags:
  """The four flags, defined once in the calling script's absl flag set."""
  return ProcessFlags(
    coordinator_address=flags.DEFINE_string(
      'coordinator_address',
      None,
      'Multi-process runs: HOST:PORT of process 0 (same on every process).',
    ),
    num_processes=flags.DEFINE_integer('num_processes', None, 'Multi-process runs: processes.'),
    process_id=flags.DEFINE_integer('process_id', None, "Multi-process runs: this one's index."),
    distributed=flags.DEFINE_bool(
      'distributed',
      False,
      'Join a multi-process run whose processes JAX detects (TPU pod slice, SLURM, Open MPI).',
    ),
  )


def join(given: ProcessFlags) -> bool:
  """The platform (`cpu_unless_accelerators`), then `jax.distributed.initialize` when the
  flags or the environment ask for several processes (before anything starts JAX's backend);
  then only process 0 prints to stdout. True when it joined; ConfigError or RunError (one
  line) when it cannot."""
  cpu_unless_accelerators()
  joined = guards.start_processes(
    given.coordinator_address.value,
    given.num_processes.value,
    given.process_id.value,
    detect=given.distributed.value,
  )
  if joined:
    import jax  # noqa: PLC0415 (after the backend may be started)

    if jax.process_index() != 0:  # process 0 speaks for the run; errors still go to stderr
      sys.stdout = open(os.devnull, 'w')  # noqa: SIM115 (for the life of the process)
  return joined
