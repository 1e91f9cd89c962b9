"""Decode throughput: our jitted sampler against transformers' `generate` (PyTorch, CPU).

Same weights on both sides (ours exported with `hf.export_hf`, read by
`AutoModelForCausalLM`), logits checked equal first, fixed-length sampling (no EOS,
64 new tokens) at temperature 1 with no truncation, the same number of threads.
Reports medians of repeated timed runs and the ratio, measured side by side in one
process, plus this machine's fp32 matmul rate as a reference point and the decode's
fraction of the matmul rate on the decode's own shapes (`decode_fraction_of_matmul_rate`:
the sampler's matmul FLOP/s over those of a loop doing only its matmuls, same weights,
same batch).

  python benchmarks/sampler_vs_transformers.py [--batch 32] [--prompt 32] [--new 64]
  python benchmarks/sampler_vs_transformers.py --model=checkpoints/gemma3-270m   # a real one

By default both sides run a 5.9 M-parameter Gemma with random weights; --model=DIR runs a
local Hugging Face checkpoint instead (its weights as stored, in float32; prompts are random
token ids). The timed runs alternate (ours, theirs, ours, ...), so a change in the machine's
load hits both alike; the 1-minute load average before and after is reported.
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bond_jax.models import decoder as model_lib
from bond_jax.models import hf, presets, sampling

# The 5.9 M-parameter Gemma config of shared/guides/PERFORMANCE.md.
CFG = presets.PRESETS['bench_5m']


def median_seconds(fn, *args, reps: int = 5) -> float:
  """Median wall time of `fn(*args)` (jitted; compiled by a first, untimed call)."""
  fn(*args).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  return 2 * n**3 / median_seconds(jax.jit(lambda x: x @ x), a, reps=reps) / 1e9


def decode_matmul_flops(cfg: model_lib.ModelConfig) -> int:
  """Matmul FLOPs one row spends per decoded token: every weight matrix once (q, k, v, o,
  gate, up, down in each layer, and the tied output projection); attention over the cache
  is left out (small at these lengths), so the fraction below is a slight underestimate."""
  d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  return 2 * (cfg.num_layers * per_layer + cfg.vocab_size * d)


def decode_shaped_matmul_gflops(
  cfg: model_lib.ModelConfig, params, batch: int, steps: int, reps: int = 5
) -> float:
  """GFLOP/s of the decode's own matmuls alone: `steps` token steps of [batch, D] rows
  through every weight matrix of `params` (the shapes and weights the sampler multiplies),
  in one jitted loop as the sampler's decode is (on its decode layout: q, k, v, o, gate-up
  and down per layer), nothing else (no attention, sampling, cache or norms). Decode
  tokens/s x `decode_matmul_flops` over this is the fraction of the matmul rate the
  sampler reaches."""
  # The sampler's decode layout: gate and up stacked into one matrix (`decode_layout`).
  decode = sampling.decode_params(params, None)
  layers = [decode[f'layer_{i}'] for i in range(cfg.num_layers)]
  table = params['embedder']['embedding']

  def token(_, x):
    for p in layers:
      a, m = p['attn'], p['mlp']
      q = jnp.einsum('bd,dnh->bnh', x, a['q_proj']['kernel'])
      k = jnp.einsum('bd,dkh->bkh', x, a['k_proj']['kernel'])
      v = jnp.einsum('bd,dkh->bkh', x, a['v_proj']['kernel'])
      q = q + jnp.mean(k + v, axis=1, keepdims=True)  # k and v feed the output: not dead code
      x = x + jnp.einsum('bnh,nhd->bd', q, a['o_proj']['kernel'])
      gate_up = jnp.einsum('bd,dtf->btf', x, m['gate_up_proj']['kernel'])
      hidden = jnp.tanh(gate_up[:, 0]) * gate_up[:, 1]
      x = x + hidden @ m['down_proj']['kernel']
    logits = x @ table.T
    return jnp.tanh(x + logits[:, : x.shape[1]])

  run = jax.jit(lambda x: jax.lax.fori_loop(0, steps, token, x))
  x = jnp.ones((batch, cfg.embed_dim), jnp.float32) * 0.01
  seconds = median_seconds(run, x, reps=reps)
  return batch * steps * decode_matmul_flops(cfg) / seconds / 1e9


def load_models(model_dir: str) -> tuple[model_lib.ModelConfig, dict, torch.nn.Module]:
  """(cfg, our params, transformers' model) on the same float32 weights: the checkpoint in
  `model_dir`, or CFG with random weights exported for transformers."""
  if model_dir:
    cfg, params = hf.load_params(model_dir, dtype='float32')
    path = model_dir
  else:
    cfg, params = CFG, model_lib.init_params(CFG, jax.random.PRNGKey(0))
    path = tempfile.mkdtemp()
    hf.export_hf(CFG, params, path)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return cfg, params, torch_model.eval()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--prompt', type=int, default=32)
  ap.add_argument('--new', type=int, default=64)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--out', default='')
  ap.add_argument('--model', default='', help='a local HF checkpoint dir (default: random tiny)')
  args = ap.parse_args()
  threads = os.cpu_count()
  torch.set_num_threads(threads)

  cfg, params, torch_model = load_models(args.model)
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
  valid = np.ones_like(prompt, bool)

  # Same weights: logits agree before anything is timed.
  ours = np.asarray(model_lib.forward(cfg, params, jnp.asarray(prompt), jnp.asarray(valid)))
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(prompt).long()).logits.numpy()
  rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  assert rel < 1e-4, f'logits differ: max rel {rel}'

  sp = sampling.SamplingParams(max_new_tokens=args.new, eos_id=None)
  run = lambda key: sampling.sample_jit(cfg, params, prompt, valid, key, sp)
  t = time.perf_counter()
  jax.block_until_ready(run(jax.random.PRNGKey(0)))
  compile_s = time.perf_counter() - t

  gen_kwargs = dict(
    do_sample=True,
    max_new_tokens=args.new,
    min_new_tokens=args.new,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    pad_token_id=0,
    attention_mask=torch.ones(prompt.shape, dtype=torch.long),
  )
  ids = torch.from_numpy(prompt).long()
  load_before = os.getloadavg()
  ours_s, theirs_s = [], []
  with torch.no_grad():
    torch_model.generate(ids, **gen_kwargs)  # warm-up
    for i in range(args.reps):  # interleaved: ours, theirs, ours, ...
      t = time.perf_counter()
      jax.block_until_ready(run(jax.random.PRNGKey(i + 1)))
      ours_s.append(time.perf_counter() - t)
      t = time.perf_counter()
      torch_model.generate(ids, **gen_kwargs)
      theirs_s.append(time.perf_counter() - t)
  load_after = os.getloadavg()

  tokens = args.batch * args.new
  result = {
    'device': jax.devices()[0].device_kind,
    'model': args.model or 'random tiny Gemma (CFG)',
    'params': int(sum(x.size for x in jax.tree.leaves(params))),
    'threads': threads,
    'load_avg_1m_before_after': [load_before[0], load_after[0]],
    'batch': args.batch,
    'prompt': args.prompt,
    'new_tokens': args.new,
    'logits_max_rel_diff': rel,
    'ours_compile_s': compile_s,
    'ours_median_s': statistics.median(ours_s),
    'transformers_median_s': statistics.median(theirs_s),
    'ours_tokens_per_s': tokens / statistics.median(ours_s),
    'transformers_tokens_per_s': tokens / statistics.median(theirs_s),
    'matmul_fp32_gflops': matmul_gflops(),
    'decode_gflops': tokens / statistics.median(ours_s) * decode_matmul_flops(cfg) / 1e9,
    'decode_shaped_matmul_gflops': decode_shaped_matmul_gflops(cfg, params, args.batch, args.new),
    'versions': {
      'jax': jax.__version__,
      'torch': torch.__version__,
      'transformers': transformers.__version__,
    },
  }
  result['speedup'] = result['transformers_median_s'] / result['ours_median_s']
  # Issue 9's target: decode at >= 40% of the matmul rate on its own shapes.
  result['decode_fraction_of_matmul_rate'] = (
    result['decode_gflops'] / result['decode_shaped_matmul_gflops']
  )
  print(json.dumps(result, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
