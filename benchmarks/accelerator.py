"""Accelerator figures for the gemma_2b shape with random weights, written as JSON.

  python benchmarks/accelerator.py --out=accelerator.json            # a GPU (H100 / H200)
  python benchmarks/accelerator.py --shape=tiny --out=/tmp/acc.json  # smoke test on a CPU
  options: --parts=decode,train,jbond (a subset), --timeout_scale=0.5 (every part's limit
  times this), --timeouts=decode:150,jbond:200 (limits by part, in seconds), --no_isolate
  (all parts in this process, no limits)

Three parts, each in its own process with its own time limit (a part that fails, runs out
of memory or runs past its limit is reported in the JSON under its name with the error, and
the other parts still run):

- decode: `sampling.sample_jit` with bf16 weights at batch 64 and 128, prompt 512, 256 new
  tokens (fixed length). Tokens/s end to end (prefill included), and the decode step alone:
  (time for 256 new tokens - time for 1) / 255. Memory-bandwidth utilisation (MBU) = bytes a
  decode step must read (every weight once, plus each row's live KV cache: prompt + tokens
  so far, on average P + G/2) / step time / the device's peak bandwidth (see PEAKS); the
  bytes of a read of the whole cache buffer (P + G per row) are reported too.
- train: a supervised step on the same shape (fp32 master weights, bf16 activations, Adam
  with a bf16 first moment, `model.remat` as in configs/jbond_gemma2b.py), 32 rows, loss =
  the log-likelihood of 1024 tokens after a 1-token prompt with log-probs projected 64 positions
  at a time (`sampling.sequence_logprobs`, as the J-BOND update computes them). MFU = 6 x
  parameters x tokens per second / the device's peak bf16 dense FLOP/s; also with the
  attention term 12 x layers x heads x head_dim x sequence length per token. Rematerialised
  FLOPs are not counted (model FLOPs).
- jbond: the J-BOND train step (`algo.step.make_train_step`) with the memory knobs of
  configs/jbond_gemma2b.py: remat 'block', sampling 32 prompts at a time, log-prob and
  gradient micro-batches of 16 rows, log-prob chunks of 64 positions, pi_ref and Adam's first
  moment in bf16; 128 prompts of 512 tokens, 1 policy + 2 anchor samples of 256 tokens each,
  and a programmatic reward (the count of tokens below vocab/2: no reward model). Prompts/s
  and generated tokens/s.

The decode part also measures the bandwidth of a plain copy, and the train part the rate of
a plain bf16 matmul, on the same device; on a device without a PEAKS entry (a CPU) the
utilisations are against those measured rates instead (the JSON names which). `--shape=tiny`
runs every part on the tiny preset at small sizes, in about a minute on a busy 2-core CPU
(mostly compilation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bond_jax.models import presets

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Peak HBM bandwidth (bytes/s) and dense bf16 FLOP/s (no sparsity), by a substring of
# `jax.devices()[0].device_kind`; the first match wins.
PEAKS: list[tuple[str, float, float]] = [
  ('H200', 4.8e12, 989e12),
  ('H100 PCIe', 2.0e12, 756e12),
  ('H100 NVL', 3.9e12, 835e12),
  ('H100', 3.35e12, 989e12),  # SXM: device_kind 'NVIDIA H100 80GB HBM3'
  ('A100-SXM4-80GB', 2.039e12, 312e12),
  ('A100', 1.555e12, 312e12),
]


@dataclasses.dataclass(frozen=True)
class Shape:
  """The model and the sizes of each part."""

  preset: str
  decode_batches: tuple[int, ...]
  prompt_len: int
  new_tokens: int
  train_batch: int
  train_tokens: int  # tokens with a log-prob per row (after a 1-token prompt)
  jbond_prompts: int
  sample_micro_batch: int
  micro_batch: int
  logprob_chunk: int
  remat: str
  reps: int
  timeouts: dict[str, int]


SHAPES = {
  'gemma_2b': Shape(
    preset='gemma_2b',
    decode_batches=(64, 128),
    prompt_len=512,
    new_tokens=256,
    train_batch=32,
    train_tokens=1024,
    jbond_prompts=128,
    sample_micro_batch=32,
    micro_batch=16,
    logprob_chunk=64,
    remat='block',
    reps=3,
    timeouts={'decode': 420, 'train': 300, 'jbond': 600},
  ),
  'tiny': Shape(
    preset='tiny',
    decode_batches=(4,),
    prompt_len=16,
    new_tokens=8,
    train_batch=2,
    train_tokens=32,
    jbond_prompts=4,
    sample_micro_batch=2,
    micro_batch=4,
    logprob_chunk=4,
    remat='block',
    reps=2,
    timeouts={'decode': 120, 'train': 120, 'jbond': 120},
  ),
}


# ---------------------------------------------------------------------------
# Helpers used inside a part's process (they import jax).


def _median_time(fn: Callable[[], Any], reps: int) -> float:
  """Median wall time of fn() over `reps` calls, each waited for; fn has been warmed up."""
  import jax

  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def device_info() -> dict[str, Any]:
  """The device and its peaks from PEAKS (None where unknown, e.g. a CPU)."""
  import jax

  dev = jax.devices()[0]
  kind = dev.device_kind
  base = {'platform': dev.platform, 'device': kind, 'devices': jax.device_count(),
          'jax': jax.__version__}  # fmt: skip
  for name, bandwidth, flops in PEAKS:
    if dev.platform == 'gpu' and name.lower() in kind.lower():
      return {**base, 'peak_bandwidth': bandwidth, 'peak_bf16_flops': flops}
  return {**base, 'peak_bandwidth': None, 'peak_bf16_flops': None}


def peak_memory_gib() -> float | None:
  """The most memory this process's JAX allocator has held on device 0 (GiB), or None where
  the backend does not say (a CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def _progress(message: str) -> None:
  """One line to the part's log (its tail is reported if the part fails or times out)."""
  print(f'{time.strftime("%H:%M:%S")} {message}', flush=True)


def copy_bandwidth(mib: int) -> float:
  """Bytes/s of a jitted elementwise pass over an fp32 array of `mib` MiB (read + write)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((mib * 2**18,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  f(x).block_until_ready()
  return 2 * x.nbytes / _median_time(lambda: f(x), 5)


def matmul_flops(n: int, dtype: str) -> float:
  """FLOP/s of a jitted n x n matmul in `dtype`."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  return 2 * n**3 / _median_time(lambda: f(a), 5)


def _param_bytes(params: Any) -> tuple[int, int]:
  import jax

  leaves = jax.tree.leaves(params)
  return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def _init_params(cfg: Any, seed: int) -> Any:
  import jax

  from bond_jax.models import decoder as model_lib

  return jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------
# The parts. Each returns a JSON-able dict.


def _sampler(cfg: Any, params: Any, prompt: Any, valid: Any, sp: Any) -> Callable[[], Any]:
  import jax

  from bond_jax.models import sampling

  key = jax.random.PRNGKey(1)
  return lambda: sampling.sample_jit(cfg, params, prompt, valid, key, sp).tokens_BxG


def part_decode(shape: Shape) -> dict[str, Any]:
  """Decode tokens/s and memory-bandwidth utilisation at each batch of `shape`."""
  import jax
  import numpy as np

  from bond_jax.models import sampling

  info = device_info()
  cfg = presets.preset(shape.preset, dtype='bfloat16', param_dtype='bfloat16')
  params = _init_params(cfg, 0)
  n_params, weight_bytes = _param_bytes(params)
  p, g = shape.prompt_len, shape.new_tokens
  kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 K and V
  out: dict[str, Any] = {
    **info,
    'params': n_params,
    'weight_bytes': weight_bytes,
    'kv_bytes_per_token': kv_bytes_per_token,
    'prompt_len': p,
    'new_tokens': g,
  }
  out['measured_copy_bandwidth'] = copy_bandwidth(64 if shape.preset == 'tiny' else 1024)
  bandwidth = info['peak_bandwidth'] or out['measured_copy_bandwidth']
  rng = np.random.default_rng(0)
  for batch in shape.decode_batches:
    prompt = rng.integers(3, cfg.vocab_size, (batch, p)).astype(np.int32)
    valid = np.ones_like(prompt, bool)
    full = sampling.SamplingParams(max_new_tokens=g, eos_id=None)
    one = sampling.SamplingParams(max_new_tokens=1, eos_id=None)
    run_full = _sampler(cfg, params, prompt, valid, full)
    run_one = _sampler(cfg, params, prompt, valid, one)
    _progress(f'decode batch {batch}: compiling')
    t = time.perf_counter()
    jax.block_until_ready(run_full())
    jax.block_until_ready(run_one())
    compile_s = time.perf_counter() - t
    _progress(f'decode batch {batch}: compiled in {compile_s:.0f} s; timing')
    full_s = _median_time(run_full, shape.reps)
    one_s = _median_time(run_one, shape.reps)
    step_s = max(full_s - one_s, 1e-9) / (g - 1)
    live_bytes = weight_bytes + batch * (p + g / 2) * kv_bytes_per_token
    buffer_bytes = weight_bytes + batch * (p + g) * kv_bytes_per_token
    out[f'batch_{batch}'] = {
      'compile_s': compile_s,
      'generate_s': full_s,
      'prefill_and_one_token_s': one_s,
      'decode_step_s': step_s,
      'tokens_per_s': batch * g / full_s,
      'decode_tokens_per_s': batch / step_s,
      'bytes_per_step_live_cache': live_bytes,
      'bytes_per_step_whole_cache': buffer_bytes,
      'bound_step_s': live_bytes / bandwidth,
      'mbu': live_bytes / step_s / bandwidth,
      'mbu_whole_cache': buffer_bytes / step_s / bandwidth,
      'mbu_against': 'peak' if info['peak_bandwidth'] else 'measured_copy_bandwidth',
      'fraction_of_measured_copy_bandwidth': live_bytes / step_s / out['measured_copy_bandwidth'],
    }
    _progress(f'decode batch {batch}: {batch / step_s:.0f} decode tokens/s')
  out['peak_memory_gib'] = peak_memory_gib()
  return out


def part_train(shape: Shape) -> dict[str, Any]:
  """Train-step MFU of a supervised step on `shape`'s model."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from bond_jax.algo.state import make_optimizer
  from bond_jax.models import sampling

  info = device_info()
  cfg = presets.preset(shape.preset, dtype='bfloat16', param_dtype='float32', remat=shape.remat)
  params = _init_params(cfg, 0)
  n_params, _ = _param_bytes(params)
  tx, _ = make_optimizer(1e-5, warmup_steps=0, mu_dtype='bfloat16')
  opt_state = tx.init(params)
  b, g = shape.train_batch, shape.train_tokens
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, 1)), jnp.int32)
  response = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, g)), jnp.int32)
  prompt_valid = jnp.ones(prompt.shape, bool)
  mask = jnp.ones(response.shape, bool)

  def loss_fn(params):
    logp = sampling.sequence_logprobs(
      cfg, params, prompt, prompt_valid, response, mask, chunk=shape.logprob_chunk
    )
    return -jnp.mean(logp)

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  box = {'params': params, 'opt_state': opt_state}

  def run():
    box['params'], box['opt_state'], loss = step(box['params'], box['opt_state'])
    return loss

  _progress('train: compiling')
  t = time.perf_counter()
  loss0 = float(run())
  compile_s = time.perf_counter() - t
  _progress(f'train: compiled in {compile_s:.0f} s; timing')
  step_s = _median_time(run, shape.reps)
  _progress(f'train: {step_s:.3f} s/step')
  tokens = b * g
  seq = g + 1
  flops_6n = 6 * n_params * tokens
  flops_attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * tokens
  out: dict[str, Any] = {
    **info,
    'params': n_params,
    'batch': b,
    'tokens_per_row': g,
    'remat': cfg.remat,
    'logprob_chunk': shape.logprob_chunk,
    'compile_s': compile_s,
    'first_loss': loss0,
    'step_s': step_s,
    'tokens_per_s': tokens / step_s,
    'model_flops_per_s_6n': flops_6n / step_s,
    'model_flops_per_s_with_attention': (flops_6n + flops_attn) / step_s,
    'peak_memory_gib': peak_memory_gib(),
  }
  n = 512 if shape.preset == 'tiny' else (8192 if info['platform'] == 'gpu' else 2048)
  out['measured_bf16_matmul_flops'] = matmul_flops(n, 'bfloat16')
  peak = info['peak_bf16_flops'] or out['measured_bf16_matmul_flops']
  out['mfu'] = flops_6n / step_s / peak
  out['mfu_with_attention'] = (flops_6n + flops_attn) / step_s / peak
  out['mfu_against'] = 'peak' if info['peak_bf16_flops'] else 'measured_bf16_matmul_flops'
  return out


def part_jbond(shape: Shape) -> dict[str, Any]:
  """Prompts/s of the J-BOND step with the memory knobs of configs/jbond_gemma2b.py."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bond_jax.algo.algorithms import BondConfig
  from bond_jax.algo.state import init_state, make_optimizer
  from bond_jax.algo.step import StepConfig, make_train_step
  from bond_jax.models import sampling
  from bond_jax.types import parameter_free

  info = device_info()
  cfg = presets.preset(shape.preset, dtype='bfloat16', param_dtype='float32', remat=shape.remat)
  vocab = cfg.vocab_size

  def reward(prompt, valid, response, mask):
    del prompt, valid
    return jnp.sum(mask & (response < vocab // 2), axis=-1).astype(jnp.float32)

  bond = BondConfig(algorithm='jbond', beta=0.5, n=2, eta=0.02, anchor='ema')
  step_cfg = StepConfig(
    model=cfg,
    sampling=sampling.SamplingParams(max_new_tokens=shape.new_tokens, eos_id=None),
    reward_fn=parameter_free(reward),
    bond=bond,
    sample_micro_batch=shape.sample_micro_batch,
    micro_batch=shape.micro_batch,
    logprob_chunk=shape.logprob_chunk,
  )
  tx, schedule = make_optimizer(3e-6, warmup_steps=0, mu_dtype='bfloat16')
  params = _init_params(cfg, 0)
  state = init_state(bond, params, params, tx, jax.random.PRNGKey(1), ref_dtype='bfloat16')
  del params
  step = make_train_step(step_cfg, tx, schedule)
  n = shape.jbond_prompts
  rng = np.random.default_rng(0)
  valid = jnp.ones((n, shape.prompt_len), bool)
  box = {'state': state, 'tokens': 0.0}

  def run():
    prompt = jnp.asarray(rng.integers(3, vocab, (n, shape.prompt_len)), jnp.int32)
    box['state'], metrics = step(box['state'], prompt, valid)
    box['tokens'] = metrics['generated_tokens']
    return box['state'], metrics

  _progress('jbond: compiling and running the first step')
  t = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t
  _progress(f'jbond: first step in {compile_s:.0f} s; timing')
  reps = max(2, shape.reps - 1)
  step_s = _median_time(run, reps)
  _progress(f'jbond: {step_s:.2f} s/step')
  tokens = float(box['tokens'])
  return {
    **info,
    'prompts': n,
    'prompt_len': shape.prompt_len,
    'samples_per_prompt': '1 policy + 2 anchor',
    'new_tokens': shape.new_tokens,
    'generated_tokens_per_step': tokens,
    'sample_micro_batch': shape.sample_micro_batch,
    'micro_batch': shape.micro_batch,
    'logprob_chunk': shape.logprob_chunk,
    'remat': cfg.remat,
    'reward': 'programmatic (count of tokens below vocab/2)',
    'compile_s': compile_s,
    'timed_steps': reps,
    'step_s': step_s,
    'prompts_per_s': n / step_s,
    'generated_tokens_per_s': tokens / step_s,
    'peak_memory_gib': peak_memory_gib(),
  }


PARTS: dict[str, Callable[[Shape], dict[str, Any]]] = {
  'decode': part_decode,
  'train': part_train,
  'jbond': part_jbond,
}


# ---------------------------------------------------------------------------
# Driver.


def _child_env() -> dict[str, str]:
  """A part may use most of a GPU's memory (JAX preallocates 75% unless told otherwise);
  only one part runs at a time."""
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  return env


def _run_isolated(name: str, shape_name: str, timeout: float) -> dict[str, Any]:
  """Runs one part in a child process; its result, or what went wrong."""
  with tempfile.TemporaryDirectory() as tmp:
    result_path = pathlib.Path(tmp) / 'result.json'
    log_path = pathlib.Path(tmp) / 'log.txt'
    cmd = [sys.executable, __file__, f'--shape={shape_name}', f'--part={name}',
           f'--child_out={result_path}']  # fmt: skip
    t = time.perf_counter()
    with open(log_path, 'w') as log:
      try:
        proc = subprocess.run(
          cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=_child_env()
        )
        error = None if proc.returncode == 0 else f'exit code {proc.returncode}'
      except subprocess.TimeoutExpired:
        error = f'timed out after {timeout:.0f} s'
    wall_s = time.perf_counter() - t
    if error is None and result_path.is_file():
      return {**json.loads(result_path.read_text()), 'wall_s': wall_s}
    tail = log_path.read_text()[-3000:]
    return {'error': error or 'no result written', 'wall_s': wall_s, 'log_tail': tail}


def _run_here(name: str, shape: Shape) -> dict[str, Any]:
  t = time.perf_counter()
  try:
    result = PARTS[name](shape)
  except Exception as e:  # noqa: BLE001 - a part's failure is reported, not raised
    result = {'error': f'{type(e).__name__}: {e}'}
  return {**result, 'wall_s': time.perf_counter() - t}


def summary(report: dict[str, Any]) -> str:
  """A few lines for the console."""
  lines = [f'shape {report["shape"]}, {report.get("device", "?")}']
  decode = report['parts'].get('decode', {})
  for key, d in decode.items():
    if key.startswith('batch_'):
      lines.append(
        f'decode {key}: {d["tokens_per_s"]:.0f} tokens/s end to end, '
        f'{d["decode_tokens_per_s"]:.0f} tokens/s decode, MBU {d["mbu"]:.1%} '
        f'(against {d["mbu_against"]})'
      )
  train = report['parts'].get('train', {})
  if 'mfu' in train:
    lines.append(
      f'train: {train["tokens_per_s"]:.0f} tokens/s, MFU {train["mfu"]:.1%} '
      f'({train["mfu_with_attention"]:.1%} with attention; against {train["mfu_against"]})'
    )
  jbond = report['parts'].get('jbond', {})
  if 'prompts_per_s' in jbond:
    lines.append(
      f'jbond: {jbond["prompts_per_s"]:.2f} prompts/s, '
      f'{jbond["generated_tokens_per_s"]:.0f} generated tokens/s ({jbond["step_s"]:.2f} s/step)'
    )
  for name, part in report['parts'].items():
    if part.get('peak_memory_gib') is not None:
      lines.append(f'{name}: peak device memory {part["peak_memory_gib"]:.2f} GiB')
  for name, part in report['parts'].items():
    if 'error' in part:
      lines.append(f'{name}: FAILED ({part["error"]})')
  return '\n'.join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--shape', choices=sorted(SHAPES), default='gemma_2b')
  ap.add_argument('--out', default='', help='where to write the JSON report')
  ap.add_argument('--parts', default=','.join(PARTS), help='comma-separated subset of parts')
  ap.add_argument('--timeout_scale', type=float, default=1.0, help='multiplies every limit')
  ap.add_argument(
    '--timeouts', default='', help="limits in seconds by part, e.g. 'decode:150,jbond:200'"
  )
  ap.add_argument('--no_isolate', action='store_true', help='run the parts in this process')
  ap.add_argument('--part', default='', help=argparse.SUPPRESS)  # a child runs one part
  ap.add_argument('--child_out', default='', help=argparse.SUPPRESS)
  args = ap.parse_args()
  shape = SHAPES[args.shape]

  if args.part:  # child process: one part, its result to --child_out
    result = PARTS[args.part](shape)
    pathlib.Path(args.child_out).write_text(json.dumps(result))
    return

  names = [p for p in args.parts.split(',') if p]
  unknown = sorted(set(names) - set(PARTS))
  if unknown:
    ap.error(f'unknown parts {unknown}; choose from {sorted(PARTS)}')
  limits = {name: shape.timeouts[name] * args.timeout_scale for name in PARTS}
  for item in filter(None, args.timeouts.split(',')):
    name, _, seconds = item.partition(':')
    if name not in PARTS or not seconds.replace('.', '', 1).isdigit():
      ap.error(f'--timeouts: {item!r} is not PART:SECONDS with PART one of {sorted(PARTS)}')
    limits[name] = float(seconds)
  t = time.perf_counter()
  report: dict[str, Any] = {'shape': args.shape, 'config': dataclasses.asdict(shape), 'parts': {}}
  for name in names:
    limit = limits[name]
    print(f'[{name}] running (limit {limit:.0f} s)', flush=True)
    if args.no_isolate:
      report['parts'][name] = _run_here(name, shape)
    else:
      report['parts'][name] = _run_isolated(name, args.shape, limit)
    part = report['parts'][name]
    status = f'failed: {part["error"]}' if 'error' in part else 'done'
    print(f'[{name}] {status} in {part["wall_s"]:.1f} s', flush=True)
    if 'device' in part:
      report.setdefault('device', part['device'])
  report['wall_s'] = time.perf_counter() - t
  report['load_avg_1m'] = os.getloadavg()[0]
  print(summary(report))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(f'wrote {args.out}')
  print(json.dumps({k: report[k] for k in ('shape', 'wall_s') if k in report}))


if __name__ == '__main__':
  main()
