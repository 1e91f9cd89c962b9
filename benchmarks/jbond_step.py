"""One J-BOND train step against one step of TRL's `GRPOTrainer`, side by side in one process.

  pip install -r requirements-bench.txt   # trl==1.16.0 (not needed by anything else)
  python benchmarks/jbond_step.py [--prompts 32] [--new 64] [--steps 5] [--threads N]
  python benchmarks/jbond_step.py --model=checkpoints/gemma3-270m --prompts 8 --new 16
    --prompt_len 16

By default both sides train the 5.9 M-parameter Gemma of sampler_vs_transformers.py with
random weights; --model=DIR trains a local Hugging Face checkpoint instead (float32; prompts
are random token ids). With a 262k vocabulary keep the batch small: TRL holds the logits of
every completion position at once.

`--phases` also times our step's phases apart after the timed steps (sample, score,
logprobs, targets, update: `run.profiling.PhaseTimes`, as `log.phase_times_every` does in a
run), to show where our step's time goes; their sum is not the fused step's time.

What is compared, per optimizer step, at the same sample budget (32 prompts x 3 generations
of 64 tokens, fp32, temperature 1, no truncation, fixed length: no EOS on either side):

- ours: `bond_jax.algo.step.train_step` for J-BOND (beta 0.5, EMA anchor), jitted once with
  the state donated (`make_train_step`), Adam. It draws 1 policy sample and 2 anchor samples
  per prompt (the anchor is an EMA copy of the policy), scores all three, computes log
  pi_ref and log pi_anchor of the policy sample (no gradient), then one forward + backward
  over 2 rows per prompt (the policy sample and the best of the two anchor samples; with
  `--share_prompts`, the default, the prompt is read once for both) and the EMA move.
- TRL: `GRPOTrainer.train()` with `num_generations=3` and `per_device_train_batch_size=96`,
  so that one optimizer step generates 3 completions for each of 32 prompts. With
  `--beta > 0` (default 0.04) it loads a reference model and computes its log-probs of all
  96 completions (no gradient), then one forward + backward over all 96 rows; AdamW.

Same weights (ours exported with `hf.export_hf`, loaded by `AutoModelForCausalLM`; their
logits are checked equal first), same prompts in the same order (token ids written as words
of a word-level tokenizer that maps word i to id i), same programmatic reward (the number of
completion tokens whose id is below vocab/2: a Python function for TRL, its jnp twin for us),
same number of threads for PyTorch and XLA (XLA's CPU pool is sized from the CPUs the process
may run on, so with --threads below the core count the process is pinned to that many).

By default the steps are interleaved (TRL step, our step, TRL step, ...) so that a change
in the machine's load hits both sides alike; `--order=sequential` runs all of TRL's steps,
then all of ours. Each side's first step (compile / warm-up) is not timed. Prints a table
and, as its last line, the results as JSON (with the 1-minute load average before and after).

On a small machine shared with other work, compare at a low load: PyTorch's OpenMP threads
suffer far more than XLA's from competing processes (on a busy 2-core machine TRL's generate
of 96 x 64 tokens took 3.4 s with 1 thread and 10-26 s with 2), which inflates the ratio;
`--threads=1` gives a figure that depends little on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2  # Gemma's ids, shared by the exported config and the tokenizer
LEARNING_RATE = 1e-6


def set_threads(threads: int) -> None:
  """Give PyTorch and XLA the same number of CPU threads. Must run before jax starts."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + f' --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}'
  ).strip()
  import torch

  torch.set_num_threads(threads)


def word_tokenizer(vocab_size: int) -> Any:
  """A tokenizer whose word `t{i}` is token id i (ids 0-2 are pad, EOS, BOS; nothing is added
  to a text), for TRL's prompts."""
  import tokenizers
  import transformers

  special = {'<pad>': PAD_ID, '<eos>': EOS_ID, '<bos>': BOS_ID}
  vocab = {**special, **{f't{i}': i for i in range(len(special), vocab_size)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<pad>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix='##', cleanup=False)
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token='<pad>',
    eos_token='<eos>',
    bos_token='<bos>',
    padding_side='left',
    truncation_side='left',
  )


def count_reward_ids(ids: list[int], vocab_size: int) -> float:
  """The programmatic reward: how many completion tokens have an id below vocab/2."""
  return float(sum(t < vocab_size // 2 for t in ids))


def ours_phases(step_cfg: Any, tx: Any, state: Any, prompt: Any, valid: Any) -> dict[str, float]:
  """Median seconds of each phase of our step (`run.profiling.PhaseTimes`: sample, score,
  logprobs, targets, update, each jitted apart) over 3 measurements on one batch."""
  import types

  from bond_jax.models import sharding
  from bond_jax.run import profiling

  mesh = sharding.make_mesh(1)  # this process's one CPU device
  # PhaseTimes reads only these two fields of a run's setup.
  phases = profiling.PhaseTimes(types.SimpleNamespace(step_cfg=step_cfg, tx=tx), mesh)
  runs = [phases.measure(state, prompt, valid, None) for _ in range(4)][1:]  # 1st compiles
  return {name.split('/')[1][:-2]: statistics.median(r[name] for r in runs) for name in runs[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds both sides on the same weights and prompts, runs their steps, returns the figures."""
  set_threads(args.threads)
  import datasets
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  import trl

  from bond_jax.algo.algorithms import BondConfig
  from bond_jax.algo.state import init_state, make_optimizer
  from bond_jax.algo.step import StepConfig, make_train_step
  from bond_jax.models import decoder as model_lib
  from bond_jax.models import hf, sampling
  from bond_jax.models.presets import PRESETS
  from bond_jax.types import parameter_free

  cfg_default = PRESETS['bench_5m']  # the tiny Gemma both benchmarks time by default

  if args.model:
    cfg, params = hf.load_params(args.model, dtype='float32')
  else:
    cfg, params = cfg_default, model_lib.init_params(cfg_default, jax.random.PRNGKey(0))
  vocab = cfg.vocab_size
  steps = args.steps + 1  # the first step of each side compiles / warms up, untimed
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, vocab, (steps, args.prompts, args.prompt_len)).astype(np.int32)
  valid = np.ones(prompts.shape[1:], bool)

  # --- ours: the J-BOND step, jitted once, state donated.
  def jnp_reward(prompt, prompt_valid, response, mask):
    del prompt, prompt_valid
    return jnp.sum(mask & (response < vocab // 2), axis=-1).astype(jnp.float32)

  bond = BondConfig(algorithm='jbond')  # beta 0.5, n = 2 anchor samples, EMA anchor
  step_cfg = StepConfig(
    model=cfg,
    sampling=sampling.SamplingParams(max_new_tokens=args.new, eos_id=None),
    reward_fn=parameter_free(jnp_reward),
    bond=bond,
    share_prompts=args.share_prompts,
  )
  tx, schedule = make_optimizer(LEARNING_RATE, warmup_steps=0)
  step_fn = make_train_step(step_cfg, tx, schedule)  # jitted, the state donated
  box = {'state': init_state(bond, params, params, tx, jax.random.PRNGKey(1)), 'tokens': []}

  def ours_step(i: int) -> None:
    box['state'], metrics = step_fn(box['state'], prompts[i], valid)
    jax.block_until_ready((box['state'], metrics))
    box['tokens'].append(float(metrics['generated_tokens']))

  def time_ours(times: list[float]) -> None:
    t = time.perf_counter()
    ours_step(len(times))
    times.append(time.perf_counter() - t)

  class Interleave(transformers.TrainerCallback):
    """Times each TRL step (end to end, from the end of the previous one) and, when
    interleaving, runs one of our steps after it, outside TRL's timing."""

    def __init__(self) -> None:
      self.trl_s: list[float] = []
      self.ours_s: list[float] = []
      self.mark = 0.0

    def on_train_begin(self, train_args, state, control, **kwargs):
      self.mark = time.perf_counter()

    def on_step_end(self, train_args, state, control, **kwargs):
      self.trl_s.append(time.perf_counter() - self.mark)
      if args.order == 'interleaved':
        time_ours(self.ours_s)
      self.mark = time.perf_counter()

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = pathlib.Path(args.model or pathlib.Path(tmp) / 'model')
    if not args.model:
      hf.export_hf(
        cfg, params, model_dir, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID
      )
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    # Same weights: logits agree before anything is timed.
    ours = np.asarray(model_lib.forward(cfg, params, jnp.asarray(prompts[0]), jnp.asarray(valid)))
    with torch.no_grad():
      theirs = model(torch.from_numpy(prompts[0]).long()).logits.numpy()
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert rel < 1e-4, f'logits differ: max rel {rel}'

    # --- TRL: GRPO on the same prompts, in the same order.
    tokenizer = word_tokenizer(vocab)
    text = [' '.join(f't{t}' for t in row) for row in prompts.reshape(-1, args.prompt_len)]
    assert tokenizer(text[:1])['input_ids'][0] == prompts[0, 0].tolist()
    lengths: list[int] = []

    def trl_reward(completions, completion_ids, **kwargs):
      del completions, kwargs
      lengths.extend(len(ids) for ids in completion_ids)
      return [count_reward_ids(ids, vocab) for ids in completion_ids]

    generations = 3
    config = trl.GRPOConfig(
      output_dir=str(pathlib.Path(tmp) / 'trl'),
      use_cpu=True,
      bf16=False,
      fp16=False,
      gradient_checkpointing=False,
      per_device_train_batch_size=args.prompts * generations,
      gradient_accumulation_steps=1,
      num_generations=generations,
      max_completion_length=args.new,
      generation_kwargs={'min_new_tokens': args.new},  # fixed length: EOS is suppressed
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      beta=args.beta,
      learning_rate=LEARNING_RATE,
      lr_scheduler_type='constant',
      max_grad_norm=0.0,  # no clipping, as ours
      max_steps=steps,
      shuffle_dataset=False,
      report_to='none',
      logging_strategy='no',
      save_strategy='no',
      eval_strategy='no',
      disable_tqdm=True,
      dataloader_num_workers=0,
      seed=0,
    )
    interleave = Interleave()
    trainer = trl.GRPOTrainer(
      model=model,
      reward_funcs=trl_reward,
      args=config,
      train_dataset=datasets.Dataset.from_dict({'prompt': text}),
      processing_class=tokenizer,
      callbacks=[interleave],
    )
    generate_s: list[float] = []
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
      t = time.perf_counter()
      out = generate(*a, **k)
      generate_s.append(time.perf_counter() - t)
      return out

    trainer._generate_single_turn = timed_generate
    load_before = os.getloadavg()
    trainer.train()
    while len(interleave.ours_s) < steps:  # --order=sequential
      time_ours(interleave.ours_s)
    load_after = os.getloadavg()

  rows = args.prompts * generations
  want_tokens = rows * args.new
  assert lengths == [args.new] * (rows * steps), 'TRL completions are not all full length'
  assert box['tokens'] == [want_tokens] * steps, f'ours generated {box["tokens"]} tokens'
  phase_s = ours_phases(step_cfg, tx, box['state'], prompts[0], valid) if args.phases else {}
  ours_s = statistics.median(interleave.ours_s[1:])
  trl_s = statistics.median(interleave.trl_s[1:])
  result = {
    'device': jax.devices()[0].device_kind,
    'model': args.model or 'random tiny Gemma (preset bench_5m)',
    'params': int(sum(x.size for x in jax.tree.leaves(params))),
    'threads': args.threads,
    'order': args.order,
    'load_avg_1m_before_after': [load_before[0], load_after[0]],
    'prompts': args.prompts,
    'prompt_len': args.prompt_len,
    'generations_per_prompt': generations,
    'new_tokens': args.new,
    'generated_tokens_per_step': want_tokens,
    'timed_steps': args.steps,
    'logits_max_rel_diff': rel,
    'trl_beta': args.beta,
    'ours_share_prompts': args.share_prompts,
    'ours_compile_s': interleave.ours_s[0],
    'ours_step_s': interleave.ours_s[1:],
    'trl_step_s': interleave.trl_s[1:],
    'trl_generate_s_median': statistics.median(generate_s[1:]),
    'ours_median_s': ours_s,
    'trl_median_s': trl_s,
    'ours_prompts_per_s': args.prompts / ours_s,
    'trl_prompts_per_s': args.prompts / trl_s,
    'ours_tokens_per_s': want_tokens / ours_s,
    'trl_tokens_per_s': want_tokens / trl_s,
    'speedup': trl_s / ours_s,
    'ours_phase_s_median': phase_s,
    'versions': {
      'jax': jax.__version__,
      'torch': torch.__version__,
      'transformers': transformers.__version__,
      'trl': trl.__version__,
    },
  }
  return result


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--prompts', type=int, default=32)
  ap.add_argument('--prompt_len', type=int, default=32)
  ap.add_argument('--new', type=int, default=64, help='tokens per generation (fixed length)')
  ap.add_argument('--steps', type=int, default=5, help='timed steps per side, after one warm-up')
  ap.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  ap.add_argument('--beta', type=float, default=0.04, help="TRL's KL weight (> 0 loads pi_ref)")
  ap.add_argument('--order', choices=('interleaved', 'sequential'), default='interleaved')
  ap.add_argument('--out', default='', help='also write the JSON here')
  ap.add_argument('--model', default='', help='a local HF checkpoint dir (default: random tiny)')
  ap.add_argument('--phases', action='store_true', help='also time our phases apart, after')
  ap.add_argument(
    '--share_prompts',
    action=argparse.BooleanOptionalAction,
    default=True,
    help="our update reads each prompt once for its two rows (configs/jbond_tiny.py's setting)",
  )
  args = ap.parse_args()
  result = run(args)
  table = [
    ('', 'bond_jax J-BOND', 'TRL GRPO', 'ratio'),
    ('s/step (median)', f'{result["ours_median_s"]:.2f}', f'{result["trl_median_s"]:.2f}',
     f'{result["speedup"]:.2f}x'),
    ('prompts/s', f'{result["ours_prompts_per_s"]:.2f}', f'{result["trl_prompts_per_s"]:.2f}',
     f'{result["speedup"]:.2f}x'),
    ('generated tokens/s', f'{result["ours_tokens_per_s"]:.0f}',
     f'{result["trl_tokens_per_s"]:.0f}', f'{result["speedup"]:.2f}x'),
  ]  # fmt: skip
  print(
    f'{result["prompts"]} prompts x {result["generations_per_prompt"]} generations x '
    f'{result["new_tokens"]} tokens, {result["threads"]} threads, {result["device"]}, '
    f'load {result["load_avg_1m_before_after"]}; TRL generate {result["trl_generate_s_median"]:.2f}'
    f' s/step; ours compile {result["ours_compile_s"]:.1f} s'
  )
  for row in table:
    print(f'{row[0]:<20}{row[1]:>16}{row[2]:>12}{row[3]:>8}')
  if result['ours_phase_s_median']:
    print('ours, phases apart (s):', result['ours_phase_s_median'])
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
