"""The memory planner's report: what each device holds, line by line, and the JSON line."""

from __future__ import annotations

from bond_jax.run.memory_plan import CALIBRATION_SHAPES, Plan
from bond_jax.run.plan_targets import GIB, MIB, local_gpus

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
