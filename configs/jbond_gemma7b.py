"""J-BOND on Gemma 7B: the paper's Section 6 setting (Algorithm 2; Fig. 5 and 7).

Command (from the repository root; every path is local, nothing is downloaded):

  python scripts/train.py --config=configs/jbond_gemma7b.py --workdir=runs/jbond_gemma7b \\
    --config.model.hf_checkpoint=/ckpt/gemma-1.1-7b-it \\
    --config.reward.checkpoint=/ckpt/gemma-7b-reward \\
    --config.data.jsonl_path=/data/prompts.jsonl

model.hf_checkpoint is pi_ref (an instruction-tuned, i.e. supervised fine-tuned,
Gemma 7B: *ForCausalLM safetensors + tokenizer files); reward.checkpoint a
*ForSequenceClassification reward model with one label (the paper's is not
public; any supported family works, see bond_jax/data/rewards.py for how a reward
model with another tokenizer is fed); data.jsonl_path one JSON object per line
with the prompt under "prompt" (the paper's conversational prompts are not
public either). Paths default to '' and the run stops at start-up naming the
missing field. model.preset must describe the checkpoint's architecture (checked
against its config.json at start-up); for another model set
--config.model.preset to its preset, or to '' to take the checkpoint's.

Paper settings (Section 6): batch 128, Adam lr 3e-6 with 100 warm-up steps,
beta = 0.5, eta = 0.02 (Fig. 5 and 7), gamma = 0, n = 2 anchor samples. The
Fig. 5 ablation is --config.bond.anchor=periodic --config.bond.anchor_period=50;
the Fig. 7 baseline is --config.bond.algorithm=reinforce
--config.bond.beta_rl=0.01 (swept over 0.001..1).

Hardware (planned, not yet run at this scale): 8 x H100 80 GB with FSDP over all of them
(mesh.fsdp=-1), or a TPU v5e-32 (a v5e-16 does not fit): the memory planner's figures
(`python scripts/memory_plan.py --config=configs/jbond_gemma7b.py --target=gpu:8`, or
`--target=v5e:4x8`) are in docs/BENCHMARKS.md. The memory knobs are jbond_gemma2b.py's,
with micro-batches of 4 rows and 16 prompts.

Expected result (the paper's Fig. 5 and 7 shapes; its reward model is private,
so no absolute numbers): the policy's average reward rises steadily while
KL(pi || pi_ref) grows slowly and about linearly; at the same KL, the reward is
above every REINFORCE run of Fig. 7, and the EMA anchor reaches the same reward
as the periodic one at a lower KL (Fig. 5).
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """jbond_gemma2b.py with the fields below changed; every other field (and its comment) is there."""
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_gemma2b.py'))
  c.model.preset = 'gemma_7b'  # architecture: the shapes without a checkpoint; the checkpoint's config.json must agree (checked at start-up)
  c.train.micro_batch_size = 4  # rows per log-prob pass and gradient micro-batch (7B activations are larger)
  c.sampling.micro_batch_size = 16  # prompts sampled and scored at a time
  c.mesh.data = 1  # devices the batch is split over, parameters replicated (data parallel)
  c.mesh.fsdp = -1  # devices the batch and every large parameter are split over (FSDP); -1: all remaining devices
  c.mesh.model = 1  # devices each parameter is split over (tensor parallel)
  return c
