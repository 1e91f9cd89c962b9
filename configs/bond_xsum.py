"""BOND on XSum summarization: the paper's Section 4 setting (Fig. 2, 9, 10).

Command (from the repository root; the argument after ':' is beta):

  python scripts/train.py --config=configs/bond_xsum.py:0.5 --workdir=runs/bond_xsum_b05 \\
    --config.model.hf_checkpoint=/ckpt/gemma-2b-xsum-sft \\
    --config.reward.checkpoint=/ckpt/xsum-reward \\
    --config.data.tfds_data_dir=/data/tfds

Run it for beta = 0, 0.5 and 1 (the three curves of Fig. 2). BOND (Section 4):
the policy distils Best-of-N of a *fixed* anchor (pi_ref) with N = 8
(--config.bond.n=4 or 16 for Fig. 10), and r_BOND = log p_le(y) is estimated
from k = 16 anchor samples per prompt (Eq. 10; the first N of them are also the
Best-of-N candidates).

Data: TFDS xsum, `document` field, as prompt 'Summarize:\\n{text}\\nSummary:'
(documents longer than data.max_prompt_len are truncated, the template kept).
Prepare it once where there is internet, in the TF-free array_record format:
  tfds build xsum --file_format=array_record --data_dir=/data/tfds
Models: the paper uses a supervised fine-tuned T5 policy and a T5 NLI reward
model, which this codebase does not run (decoders only). Use a decoder policy
fine-tuned on XSum (e.g. Gemma 2B) and a *ForSequenceClassification reward model
with one label; a reward model with its own tokenizer is supported
(--config.reward.tokenizer_path=..., re-tokenized to reward.max_len tokens).

Not stated in the paper for this section, chosen here: batch 32, Adam lr 3e-6
with 100 warm-up steps (the J-BOND value), 5000 steps, 64 new tokens (XSum
summaries are one sentence). Paths default to '' and the run stops at start-up
naming the field. model.preset is gemma_2b and must match the checkpoint's
config.json (checked at start-up): for another policy set --config.model.preset
to its preset, or to '' to take the checkpoint's architecture.

Built from configs/jbond_gemma2b.py (same model, tokenizer, reward, optimizer,
mesh and checkpoint fields and comments); only the fields below differ.

Hardware (sized, not yet run at this scale): one host with 8 x H100 80 GB, mesh
data=2 x model=4 for a 2B policy. Each step samples 1 policy and 16 anchor
summaries per prompt (544 generations) and scores them.

Expected result (the paper's Fig. 2 shapes, N = 8; not measured here, and on the
tiny task of configs/bond_tiny.py all three betas end alike): beta = 0.5
(Jeffreys) lowers both the backward KL(pi || pi_BoN) and the forward
KL(pi_BoN || pi); beta = 1 gives the lowest backward KL, beta = 0 the lowest
forward KL; the policy's average log quantile log p_le rises about as fast with
beta = 0.5 as with beta = 1, while beta = 0 lags behind.
"""

import pathlib

import ml_collections

from bond_jax.run import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: beta, the Jeffreys weight (the paper runs 0, 0.5 and 1); default 0.5."""
  beta = 0.5 if arg is None else float(arg)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f'configs/bond_xsum.py:{arg}: beta must be in [0, 1] (paper: 0, 0.5, 1).')
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name('jbond_gemma2b.py'))
  # model.hf_checkpoint: a decoder fine-tuned on XSum: pi_ref, the fixed anchor and the policy's start.
  c.tokenizer.chat_template = False  # the SFT policy reads the plain prompt template
  c.tokenizer.eos_token = ''  # the tokenizer's EOS ends a summary

  c.data.source = 'tfds'
  c.data.tfds_name = 'xsum'  # prepared as array_record
  c.data.eval_split = 'validation'  # TFDS split of the evaluation prompts
  c.data.text_field = 'document'  # TFDS feature holding the article
  c.data.prompt_template = 'Summarize:\n{text}\nSummary:'
  c.data.max_prompt_len = 1024  # P: XSum articles are long
  c.data.overlong = 'truncate'  # keep long articles, cut their text (template kept)

  c.reward.max_len = 1152  # T: re-tokenized reward inputs (other tokenizer only) hold P = 1024 prompt tokens and the summary

  c.bond.algorithm = 'bond'  # BOND with the Jeffreys objective (Section 4)
  c.bond.beta = beta  # beta (Eq. 11), from the ':' argument
  c.bond.n = 8  # N of Best-of-N (Fig. 2; Fig. 10: 4 and 16)
  c.bond.anchor = 'fixed'  # BOND distils BoN of pi_ref (eta unused)

  c.sampling.max_new_tokens = 64  # G: one-sentence summaries

  c.train.num_steps = 5000  # BOND updates (the paper evaluates every 500)
  c.train.batch_size = 32  # prompts per update (not stated for Section 4)

  c.eval.samples_per_prompt = 32  # K pi_ref samples per prompt for the Best-of-N and KL estimates (paper: 32)
  c.eval.bon_ns = (4, 8, 16)  # N of the Best-of-N rows
  return c
