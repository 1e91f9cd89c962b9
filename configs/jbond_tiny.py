"""J-BOND on the embedded noisy-copy task: the tiny default, no download.

Command (from the repository root):

  python scripts/train.py --config=configs/jbond_tiny.py --workdir=runs/jbond_tiny

Sized for a 2-core CPU, a minute or so in all (docs/BENCHMARKS.md): the reference policy
pi_ref trained by supervised learning on noisy demonstrations, 200 J-BOND steps of 128
prompts, then the evaluation table, which the README shows. Expected: one sample of the
trained policy beats Best-of-16 of pi_ref. Rerunning the same command resumes from the last
checkpoint in the workdir.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds pi_ref's training, the data stream and sampling

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'tiny'  # architecture (bond_jax/models/presets.py): 2 layers, width 64
  c.model.dtype = 'float32'  # activation dtype
  c.model.param_dtype = 'float32'
  c.model.reference_dtype = ''  # dtype pi_ref is kept in ('' = param_dtype; it is frozen, so 'bfloat16' halves it safely)
  c.model.remat = 'none'  # recompute in the backward pass: 'none' | 'block' | 'save_dots' | 'save_attn' (memory, never values)
  c.model.scan_layers = False  # the blocks as one lax.scan over stacked parameters (the same values, one compiled layer); fixed for a run's life
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # LoRA adapters' rank (0: off, the policy is trained whole; configs/jbond_tiny_lora.py turns them on)
  c.model.lora.alpha = 0.0  # the adapters' output is scaled by alpha / rank
  c.model.lora.targets = ()  # projections with adapters: any of 'q', 'k', 'v', 'o', 'gate', 'up', 'down'

  c.task = ml_collections.ConfigDict()
  c.task.name = 'noisy_copy'  # prompts: random tokens; reward: positions copied (0..prompt_len)
  c.task.prompt_len = 8  # content tokens per prompt (= maximum reward)
  c.task.keep_prob = 0.4  # chance a demonstration token is right: pi_ref's skill

  c.reference = ml_collections.ConfigDict()
  c.reference.sft_steps = 500  # supervised steps that make pi_ref
  c.reference.sft_batch_size = 128
  c.reference.sft_learning_rate = 3e-3

  c.bond = ml_collections.ConfigDict()
  c.bond.algorithm = 'jbond'  # 'jbond' | 'bond' | 'reinforce'
  c.bond.beta = 0.5  # beta: Jeffreys weight, 0 = forward KL only, 1 = backward KL only (Eq. 11)
  c.bond.n = 2  # n: anchor samples per prompt (J-BOND: 2); N of Best-of-N for 'bond'
  c.bond.eta = 0.02  # eta: EMA rate of the anchor (Eq. 18)
  c.bond.gamma = 0.0  # gamma: weight of the extra KL(pi || anchor) term (Eq. 19)
  c.bond.use_baseline = True  # leave-one-out baseline b in the backward-KL return
  c.bond.anchor = 'ema'  # 'ema' (J-BOND) | 'periodic' (iterative BOND) | 'fixed' (BOND)
  c.bond.anchor_period = 0  # T: steps between anchor <- policy when periodic
  c.bond.quantile = 'mc'  # 'bond' only: how p_le is estimated: 'mc' (Eq. 10) | 'learned' (App. B.1)
  c.bond.quantile_learning_rate = 1e-4  # Adam step size of the learned quantile model
  c.bond.num_quantile_samples = 16  # k: anchor samples for the MC quantile (Eq. 10)
  c.bond.bon_correction = False  # 'bond' only: keep the (B) factor of r_BOND (Eq. 8; with MC quantiles it matters only where rewards tie, docs/ALGORITHMS.md section 2)
  c.bond.beta_rl = 0.01  # beta_RL: KL weight of the REINFORCE baseline (Eq. 1)
  c.bond.num_policy_samples = 2  # REINFORCE: policy samples per prompt

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 10  # generation buffer (an ideal answer is 9 tokens with EOS)
  c.sampling.temperature = 1.0  # 1.0 with no truncation: samples come from pi itself
  c.sampling.top_k = 0  # 0: off (any other value biases the KL estimates)
  c.sampling.top_p = 1.0  # 1.0: off
  c.sampling.micro_batch_size = 0  # prompts sampled and scored at a time (0: the whole batch; same samples either way)
  c.sampling.decode_dtype = ''  # decode with the weight matrices cast once per step to this dtype ('' = as stored)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4  # Adam step size after warm-up
  c.optim.warmup_steps = 20  # linear warm-up from 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 0.0  # 0: no clipping
  c.optim.mu_dtype = ''  # dtype of Adam's first moment ('' = the parameters')

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200  # BOND updates
  c.train.batch_size = 128  # prompts per update
  c.train.micro_batch_size = 0  # rows per log-prob pass and gradient micro-batch (0: all; same update either way)
  c.train.logprob_chunk = 0  # response positions turned into logits at a time (0: all G)
  c.train.share_prompts = True  # the update reads each prompt once for its policy sample and Best-of-2 row (same update; faster)
  c.train.max_bad_steps = 5  # consecutive steps with a non-finite loss, gradient, reward or log-prob (each skipped) that stop the run

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # devices the batch is split over, parameters replicated (data parallel)
  c.mesh.fsdp = -1  # devices the batch and every large parameter are split over (FSDP); -1: all remaining devices
  c.mesh.model = 1  # devices each parameter is split over (tensor parallel)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 50  # save the whole TrainState every K steps (and at the end)
  c.ckpt.keep = 2  # checkpoints kept

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 512  # held-out prompts for the final table
  c.eval.samples_per_prompt = 32  # K pi_ref samples per prompt for Best-of-N estimates
  c.eval.bon_ns = (2, 4, 8, 16)  # N of the Best-of-N rows
  c.eval.policy_samples_per_prompt = 4  # policy samples per prompt
  c.eval.kl_n = 16  # N of the KLs to Best-of-N of pi_ref (Section 8, Fig. 2); 0: off
  c.eval.every = 25  # also evaluate every K steps during training (metrics eval/...); 0: only at the end
  c.eval.every_num_prompts = 64  # the first held-out prompts (at most eval.num_prompts) of the evaluation during training

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True  # progress bar with ETA on the console
  c.log.phase_times_every = 0  # every k-th step also times its phases apart (time/<phase>_s; costs a compile per phase); 0: off
  return c
