"""J-BOND on Gemma 2B: the paper's Section 6 setting (Algorithm 2).

Command (from the repository root; every path is local, nothing is downloaded):

  python scripts/train.py --config=configs/jbond_gemma2b.py --workdir=runs/jbond_gemma2b \\
    --config.model.hf_checkpoint=/ckpt/gemma-1.1-2b-it \\
    --config.reward.checkpoint=/ckpt/gemma-2b-reward \\
    --config.data.jsonl_path=/data/prompts.jsonl

model.hf_checkpoint is pi_ref (an instruction-tuned, i.e. supervised fine-tuned,
Gemma 2B: *ForCausalLM safetensors + tokenizer files); reward.checkpoint a
*ForSequenceClassification reward model with one label (the paper's is not
public; any supported family works, see bond_jax/data/rewards.py for how a reward
model with another tokenizer is fed); data.jsonl_path one JSON object per line
with the prompt under "prompt" (the paper's conversational prompts are not
public either). Paths default to '' and the run stops at start-up naming the
missing field. model.preset must describe the checkpoint's architecture (checked
against its config.json at start-up); for another model set
--config.model.preset to its preset, or to '' to take the checkpoint's.

Paper settings (Section 6): batch 128, Adam lr 3e-6 with 100 warm-up steps,
beta = 0.5, eta = 0.02 (Fig. 5, 7; Fig. 6 sweeps eta in {0.01, 0.05, 0.1} and
gamma in {0, 0.5, 1, 2}), n = 2 anchor samples. Override e.g.
--config.bond.eta=0.05 --config.bond.gamma=1.0.

Hardware: TPU v5e-8 (16 GiB per chip), FSDP over all 8 chips (mesh.fsdp=-1), or one
80 GB GPU. Float32 master weights for policy and anchor (Adam steps of 3e-6, and EMA steps,
vanish in bfloat16), pi_ref and the reward model in bfloat16, Adam's first moment in
bfloat16; blocks rematerialised and scanned; sampling in micro-batches of 32 prompts,
log-probs and gradients in micro-batches of 16 rows, logits 64 positions at a time. Both
fits are the memory planner's (`python scripts/memory_plan.py --config=configs/jbond_gemma2b.py
--target=v5e:2x4`, or `--target=gpu:1`); docs/BENCHMARKS.md has its figures and a step's
time on a GPU. Each step samples 1 policy and 2 anchor responses of up to 256 tokens per
prompt (384 generations) and scores them.

Expected result (the paper's Fig. 6-7 shapes; its reward model is private, so no
absolute numbers): the policy's average reward rises steadily over training
while KL(pi || pi_ref) grows slowly and about linearly, with a better reward/KL
trade-off than KL-regularised REINFORCE (algorithm 'reinforce'); a larger eta
raises the reward faster, a larger gamma slows the KL growth.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds sampling and the anchor/policy RNG streams

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'gemma_2b'  # architecture (bond_jax/models/presets.py): the shapes without a checkpoint; with one, checked against its config.json ('' = the checkpoint's)
  c.model.hf_checkpoint = ''  # pi_ref: local HF *ForCausalLM dir (config.json + safetensors); policy and anchor start from it
  c.model.dtype = 'bfloat16'  # activation dtype
  c.model.param_dtype = 'float32'  # master weights of policy and anchor: Adam updates of lr 3e-6, and EMA steps eta * (theta - anchor), are below bfloat16 resolution
  c.model.reference_dtype = 'bfloat16'  # pi_ref is frozen, so bfloat16 loses nothing (Gemma checkpoints are bfloat16)
  c.model.remat = 'block'  # recompute each block in the backward pass: 'none' | 'block' | 'save_dots' | 'save_attn'
  c.model.scan_layers = True  # the blocks as one lax.scan over stacked parameters: the same values, a faster compile, less planned memory; the parameter layout, so fixed for a run's life
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # LoRA adapters' rank (0: off, the policy is trained whole)
  c.model.lora.alpha = 0.0  # the adapters' output is scaled by alpha / rank
  c.model.lora.targets = ()  # projections with adapters: any of 'q', 'k', 'v', 'o', 'gate', 'up', 'down'

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # local tokenizer dir; '' = model.hf_checkpoint
  c.tokenizer.chat_template = True  # prompt = one user turn + generation prompt (instruction-tuned policy)
  c.tokenizer.eos_token = '<end_of_turn>'  # where a response ends ('' = the tokenizer's EOS); Gemma IT ends turns here

  c.task = ml_collections.ConfigDict()
  c.task.name = 'hf'  # prompts from `data`, pi_ref from model.hf_checkpoint (no supervised stage), reward from `reward`

  c.data = ml_collections.ConfigDict()
  c.data.source = 'jsonl'  # 'tfds' | 'jsonl'
  c.data.tfds_name = ''  # TFDS builder (data.source='tfds'), prepared as array_record
  c.data.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  c.data.split = 'train'  # TFDS split of the training prompts
  c.data.eval_split = ''  # TFDS split of the evaluation prompts ('' = data.split)
  c.data.text_field = ''  # TFDS feature holding the text
  c.data.jsonl_path = ''  # local JSONL of training prompts (data.source='jsonl')
  c.data.eval_jsonl_path = ''  # JSONL of evaluation prompts ('' = data.jsonl_path)
  c.data.jsonl_field = 'prompt'  # key of each JSONL object that holds the text
  c.data.prompt_template = '{text}'  # x = template with {text} replaced, before the chat template
  c.data.max_prompt_len = 512  # P: prompts longer than this are dropped or truncated (data.overlong)
  c.data.prompt_bucket = 128  # a batch is left-padded to its longest prompt rounded up to a multiple of this (at most P: 4 compiled shapes); 0: always to P
  c.data.overlong = 'drop'  # prompts longer than P: 'drop' them | 'truncate' their text (template kept)
  c.data.shuffle_seed = 0  # epoch e visits the prompts in the permutation of (shuffle_seed, e)

  c.reward = ml_collections.ConfigDict()
  c.reward.source = 'model'  # r(x, y): 'model' (a reward model) | 'programmatic' (reward.fn) | 'python' (reward.function)
  c.reward.checkpoint = ''  # local HF *ForSequenceClassification dir, num_labels=1
  c.reward.tokenizer_path = ''  # reward model's tokenizer; '' = the policy's (ids shared, no re-tokenization)
  c.reward.chat_template = False  # re-tokenized input as user + assistant turns (other tokenizer only)
  c.reward.max_len = 1024  # T: width of re-tokenized reward inputs (other tokenizer only)
  c.reward.dtype = 'bfloat16'  # reward model activations and weights (frozen)
  c.reward.fn = ''  # reward.source='programmatic': one of rewards.PROGRAMMATIC
  c.reward.function = ''  # reward.source='python': 'module:function' of (prompts, responses) -> floats

  c.bond = ml_collections.ConfigDict()
  c.bond.algorithm = 'jbond'  # 'jbond' (Algorithm 2) | 'bond' | 'reinforce'
  c.bond.beta = 0.5  # beta: Jeffreys weight, 0 = forward KL only, 1 = backward KL only (Eq. 11)
  c.bond.n = 2  # n: anchor samples per prompt (J-BOND: 2)
  c.bond.eta = 0.02  # eta: EMA rate of the anchor (Eq. 18)
  c.bond.gamma = 0.0  # gamma: weight of the extra KL(pi || anchor) term (Eq. 19)
  c.bond.use_baseline = True  # leave-one-out baseline b in the backward-KL return
  c.bond.anchor = 'ema'  # 'ema' (J-BOND) | 'periodic' (Fig. 5 ablation, T = 50) | 'fixed'
  c.bond.anchor_period = 0  # T: steps between anchor <- policy when periodic
  c.bond.quantile = 'mc'  # 'bond' only: how p_le is estimated: 'mc' (Eq. 10) | 'learned' (App. B.1)
  c.bond.quantile_learning_rate = 1e-4  # 'bond' + 'learned' only: Adam step size of p_theta
  c.bond.num_quantile_samples = 16  # k: 'bond' only, anchor samples for the MC quantile (Eq. 10)
  c.bond.bon_correction = False  # 'bond' only: keep the (B) factor of r_BOND (Eq. 8; with MC quantiles it matters only where rewards tie, docs/ALGORITHMS.md section 2)
  c.bond.beta_rl = 0.01  # beta_RL: KL weight of the REINFORCE baseline (Eq. 1; Fig. 7 sweeps 1e-3..1)
  c.bond.num_policy_samples = 2  # REINFORCE: policy samples per prompt (leave-one-out)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 256  # G: generation buffer per response
  c.sampling.temperature = 1.0  # 1.0 with no truncation: samples come from pi itself
  c.sampling.top_k = 0  # 0: off (any other value biases the KL estimates)
  c.sampling.top_p = 1.0  # 1.0: off
  c.sampling.micro_batch_size = 32  # prompts sampled and scored at a time (0: the whole batch; same samples either way)
  c.sampling.decode_dtype = 'bfloat16'  # decode with the weight matrices cast once per step ('' = as stored); = model.dtype, so the samples are unchanged

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-6  # Adam step size after warm-up (paper)
  c.optim.warmup_steps = 100  # linear warm-up from 0 (paper)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 0.0  # 0: no clipping (the paper does not mention any)
  c.optim.mu_dtype = 'bfloat16'  # Adam's first moment in bfloat16 (the second stays float32)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2000  # J-BOND updates (the paper does not state its run length)
  c.train.batch_size = 128  # prompts per update, over all hosts (paper)
  c.train.micro_batch_size = 16  # rows per log-prob pass and gradient micro-batch (0: all; same update either way)
  c.train.logprob_chunk = 64  # response positions turned into logits at a time (0: all G)
  c.train.share_prompts = False  # True reads each prompt once for its two update rows: fewer FLOPs, more memory with scanned layers (docs/BENCHMARKS.md)
  c.train.max_bad_steps = 5  # consecutive steps with a non-finite loss, gradient, reward or log-prob (each skipped) that stop the run

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # devices the batch is split over, parameters replicated (data parallel)
  c.mesh.fsdp = -1  # devices the batch and every large parameter are split over (FSDP); -1: all remaining devices
  c.mesh.model = 1  # devices each parameter is split over (tensor parallel; sharding.PARAM_RULES)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 100  # save the whole TrainState (and the data position) every K steps
  c.ckpt.keep = 2  # checkpoints kept

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 128  # evaluation prompts (data.eval_split / data.eval_jsonl_path)
  c.eval.samples_per_prompt = 16  # K pi_ref samples per prompt for Best-of-N estimates
  c.eval.bon_ns = (2, 4, 8, 16)  # N of the Best-of-N rows
  c.eval.policy_samples_per_prompt = 4  # policy samples per prompt
  c.eval.kl_n = 4  # N of the KLs to Best-of-N of pi_ref (Section 8, Fig. 2); 0: off
  c.eval.every = 100  # also evaluate every K steps during training (metrics eval/...); 0: only at the end
  c.eval.every_num_prompts = 32  # the first held-out prompts (at most eval.num_prompts) of the evaluation during training
  c.eval.micro_batch_size = 0  # prompts sampled and scored at a time by the evaluation (0: all; the same table either way)
  c.eval.show_examples = 5  # held-out prompts printed with a sample of pi_ref and of the policy

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True  # progress bar with ETA on the console
  c.log.phase_times_every = 0  # every k-th step also times its phases apart (time/<phase>_s; costs a compile per phase); 0: off
  return c
