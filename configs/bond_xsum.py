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
with 100 warm-up steps, 5000 steps, 64 new tokens (XSum summaries are one
sentence). Paths default to '' and the run stops at start-up naming the field.
model.preset is gemma_2b and must match the checkpoint's config.json (checked at
start-up): for another policy set --config.model.preset to its preset, or to ''
to take the checkpoint's architecture.

Hardware (sized, not yet run at this scale): one host with 8 x H100 80 GB, mesh
data=2 x model=4 for a 2B policy. Each step samples 1 policy and 16 anchor
summaries per prompt (544 generations) and scores them.

Expected result (Fig. 2, N = 8): beta = 0.5 (Jeffreys) lowers both the backward
KL(pi || pi_BoN) and the forward KL(pi_BoN || pi); beta = 1 gives the lowest
backward KL, beta = 0 the lowest forward KL; the policy's average log quantile
log p_le rises about as fast with beta = 0.5 as with beta = 1, while beta = 0
lags behind.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: beta, the Jeffreys weight (the paper runs 0, 0.5 and 1); default 0.5."""
  beta = 0.5 if arg is None else float(arg)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f'configs/bond_xsum.py:{arg}: beta must be in [0, 1] (paper: 0, 0.5, 1).')
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds sampling and the anchor/policy RNG streams

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'gemma_2b'  # architecture (bond_jax/models/decoder.py PRESETS): the shapes when no checkpoint is set; with one, its config.json is loaded and must agree on every shape (checked at start-up); '' = the checkpoint's only
  c.model.hf_checkpoint = ''  # pi_ref: local HF *ForCausalLM dir fine-tuned on XSum; the fixed anchor and the policy's start
  c.model.dtype = 'bfloat16'  # activation dtype
  c.model.param_dtype = 'float32'  # master weights: Adam updates of lr 3e-6 are below bfloat16 resolution

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # local tokenizer dir; '' = model.hf_checkpoint
  c.tokenizer.chat_template = False  # the SFT policy reads the plain prompt template
  c.tokenizer.eos_token = ''  # where a response ends ('' = the tokenizer's EOS)

  c.task = ml_collections.ConfigDict()
  c.task.name = 'hf'  # prompts from `data`, pi_ref from model.hf_checkpoint (no supervised stage), reward from `reward`

  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'  # 'tfds' | 'jsonl'
  c.data.tfds_name = 'xsum'  # TFDS builder (data.source='tfds'), prepared as array_record
  c.data.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  c.data.split = 'train'  # TFDS split of the training prompts
  c.data.eval_split = 'validation'  # TFDS split of the evaluation prompts ('' = data.split)
  c.data.text_field = 'document'  # TFDS feature holding the text
  c.data.jsonl_path = ''  # local JSONL of training prompts (data.source='jsonl')
  c.data.eval_jsonl_path = ''  # JSONL of evaluation prompts ('' = data.jsonl_path)
  c.data.jsonl_field = 'prompt'  # key of each JSONL object that holds the text
  c.data.prompt_template = 'Summarize:\n{text}\nSummary:'  # x = template with {text} replaced, before the chat template
  c.data.max_prompt_len = 1024  # P: prompts are left-padded to this many tokens
  c.data.overlong = 'truncate'  # prompts longer than P: 'drop' them | 'truncate' their text (template kept)
  c.data.shuffle_seed = 0  # epoch e visits the prompts in the permutation of (shuffle_seed, e)

  c.reward = ml_collections.ConfigDict()
  c.reward.source = 'model'  # r(x, y): 'model' (a reward model) | 'programmatic' (reward.fn)
  c.reward.checkpoint = ''  # local HF *ForSequenceClassification dir, num_labels=1 (paper: T5 NLI, not supported)
  c.reward.tokenizer_path = ''  # reward model's tokenizer; '' = the policy's (ids shared, no re-tokenization)
  c.reward.chat_template = False  # re-tokenized input as user + assistant turns (other tokenizer only)
  c.reward.max_len = 1152  # T: width of re-tokenized reward inputs (other tokenizer only)
  c.reward.dtype = 'bfloat16'  # reward model activations and weights (frozen)
  c.reward.fn = ''  # reward.source='programmatic': one of rewards.PROGRAMMATIC

  c.bond = ml_collections.ConfigDict()
  c.bond.algorithm = 'bond'  # BOND with the Jeffreys objective (Section 4) | 'jbond' | 'reinforce'
  c.bond.beta = beta  # beta: Jeffreys weight, 0 = forward KL only, 1 = backward KL only (Eq. 11)
  c.bond.n = 8  # N of Best-of-N (Fig. 2; Fig. 10: 4 and 16)
  c.bond.eta = 0.02  # eta: EMA rate of the anchor (Eq. 18); unused with a fixed anchor
  c.bond.gamma = 0.0  # gamma: weight of the extra KL(pi || anchor) term (Eq. 19)
  c.bond.use_baseline = True  # leave-one-out baseline b in the backward-KL return
  c.bond.anchor = 'fixed'  # BOND distils BoN of pi_ref | 'periodic' (iterative BOND, Fig. 4: T = 1000) | 'ema'
  c.bond.anchor_period = 0  # T: steps between anchor <- policy when periodic
  c.bond.quantile = 'mc'  # 'bond' only: how p_le is estimated: 'mc' (Eq. 10) | 'learned' (App. B.1)
  c.bond.quantile_learning_rate = 1e-4  # 'bond' + 'learned' only: Adam step size of p_theta
  c.bond.num_quantile_samples = 16  # k: anchor samples for the MC quantile (Eq. 10; paper: 16)
  c.bond.bon_correction = False  # 'bond' only: keep the (B) factor of r_BOND (Eq. 8)
  c.bond.beta_rl = 0.01  # beta_RL: KL weight of the REINFORCE baseline (Eq. 1; Fig. 7 sweeps 1e-3..1)
  c.bond.num_policy_samples = 2  # REINFORCE: policy samples per prompt (leave-one-out)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 64  # G: generation buffer per response
  c.sampling.temperature = 1.0  # 1.0 with no truncation: samples come from pi itself
  c.sampling.top_k = 0  # 0: off (any other value biases the KL estimates)
  c.sampling.top_p = 1.0  # 1.0: off

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-6  # Adam step size after warm-up (not stated for Section 4: the J-BOND value)
  c.optim.warmup_steps = 100  # linear warm-up from 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 0.0  # 0: no clipping (the paper does not mention any)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 5000  # BOND updates (the paper evaluates every 500)
  c.train.batch_size = 32  # prompts per update, over all hosts (not stated for Section 4)
  c.train.max_bad_steps = 5  # consecutive steps with a non-finite loss, gradient, reward or log-prob (each skipped) that stop the run

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 2  # devices the batch is split over (data parallel)
  c.mesh.model = 4  # devices each parameter is split over (tensor parallel; sharding.PARAM_RULES)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 100  # save the whole TrainState (and the data position) every K steps
  c.ckpt.keep = 2  # checkpoints kept

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 128  # evaluation prompts (data.eval_split / data.eval_jsonl_path)
  c.eval.samples_per_prompt = 32  # K pi_ref samples per prompt for Best-of-N / KL estimates (paper: 32)
  c.eval.bon_ns = (4, 8, 16)  # N of the Best-of-N rows
  c.eval.policy_samples_per_prompt = 4  # policy samples per prompt

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True  # progress bar with ETA on the console
  return c
