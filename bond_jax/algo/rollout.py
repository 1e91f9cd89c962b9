"""Rollout phases of a train step: sample the policy and the anchor, score the samples, and
read the frozen models' log-likelihoods of the policy samples. No gradient flows here.

Rows are prompt-major: row b * S + j is sample j of prompt b when a prompt has S samples.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from bond_jax.algo import objectives
from bond_jax.models import decoder as model_lib
from bond_jax.models import sampling
from bond_jax.types import PyTree, RewardFn


@struct.dataclass
class Rows:
  """Responses with their prompts, one row each: what a log-likelihood or a reward reads."""

  prompt_BxP: jax.Array
  prompt_valid_BxP: jax.Array
  tokens_BxG: jax.Array
  mask_BxG: jax.Array

  def concat(self, other: Rows) -> Rows:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), self, other)


@struct.dataclass
class Rollout:
  """The samples of one step and what the frozen models say about them.

  policy: M samples per prompt [B*M rows]; anchor: A samples per prompt [B*A rows],
  or None when the algorithm draws none (REINFORCE).
  """

  policy: Rows
  policy_reward_B: jax.Array  # r(y) of each policy row
  logp_ref_B: jax.Array  # log pi_ref(y) of each policy row (sequence sums)
  anchor: Rows | None = None
  anchor_reward_BxA: jax.Array | None = None
  logp_anchor_B: jax.Array | None = None  # log pi_anchor(y) of each policy row
  num_prompts: int = struct.field(pytree_node=False, default=0)
  policy_per_prompt: int = struct.field(pytree_node=False, default=1)


def _repeat(x: jax.Array, times: int) -> jax.Array:
  return x if times == 1 else jnp.repeat(x, times, axis=0)


def num_micro_batches(rows: int, size: int, field: str) -> int:
  """How many micro-batches of `size` rows (0: one, the whole batch) `rows` splits into."""
  if size <= 0 or size >= rows:
    return 1
  if rows % size:
    raise ValueError(
      f'config.{field}={size} must divide the {rows} rows it splits; pick a divisor of {rows}.'
    )
  return rows // size


def map_micro_batches(
  fn: Callable[[PyTree], PyTree], tree: PyTree, size: int, field: str
) -> PyTree:
  """`fn` of `tree` ([R, ...] leaves), `size` rows at a time (0: all at once, one call) in
  strided micro-batches, joined back in row order: the same result as one call."""
  n = num_micro_batches(jax.tree.leaves(tree)[0].shape[0], size, field)
  if n == 1:
    return fn(tree)
  return join_micro_batches(jax.lax.map(fn, split_micro_batches(tree, n)))


def split_micro_batches(tree: PyTree, n: int) -> PyTree:
  """[R, ...] leaves -> [n, R / n, ...]: micro-batch i holds rows i, i + n, i + 2n, ...

  Strided rather than contiguous, so that with rows split over devices every micro-batch
  is spread over all of them (each device works on every micro-batch)."""
  split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def join_micro_batches(tree: PyTree) -> PyTree:
  """The inverse of `split_micro_batches`: [n, R / n, ...] -> [R, ...] in row order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def draw(
  model: model_lib.ModelConfig,
  sp: sampling.SamplingParams,
  reward_fn: RewardFn,
  reward_params: PyTree,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  rng: jax.Array,
  per_prompt: int,
  micro_batch: int = 0,
  decode_dtype: str | None = None,
) -> tuple[Rows, jax.Array]:
  """`per_prompt` samples of each prompt from `params` (one shared prefill), and their rewards.

  micro_batch > 0: sample and score that many prompts at a time (a prompt's samples stay
  together), so the KV cache and the reward model's activations are those of one
  micro-batch; the samples are the same (`sampling.sample` keys each row by its index).
  decode_dtype: decode with the weight matrices cast to it once (`sampling.decode_params`;
  LoRA adapters folded in for unrolled layers, kept for scanned ones)."""
  params = sampling.decode_params(params, decode_dtype, model)

  def one(prompt_BxP, prompt_valid_BxP, prompt_ids_B):
    out = sampling.sample(
      model, params, prompt_BxP, prompt_valid_BxP, rng, sp, per_prompt, prompt_ids_B
    )
    rows = Rows(
      _repeat(prompt_BxP, per_prompt),
      _repeat(prompt_valid_BxP, per_prompt),
      out.tokens_BxG,
      out.mask_BxG,
    )
    reward_B = reward_fn(
      reward_params, rows.prompt_BxP, rows.prompt_valid_BxP, rows.tokens_BxG, rows.mask_BxG
    )
    return rows, reward_B

  num_prompts = prompt_BxP.shape[0]
  prompt_ids_B = jnp.arange(num_prompts)
  n = num_micro_batches(num_prompts, micro_batch, 'sampling.micro_batch_size')
  if n == 1:
    return one(prompt_BxP, prompt_valid_BxP, prompt_ids_B)
  # Per micro-batch: [m * per_prompt] rows, prompt-major. Regroup by prompt, put the prompts
  # back in batch order, and flatten to the whole batch's prompt-major rows.
  by_prompt = lambda x: x.reshape(-1, per_prompt, *x.shape[1:])
  flat = lambda x: x.reshape(num_prompts * per_prompt, *x.shape[2:])
  out = jax.lax.map(
    lambda xs: jax.tree.map(by_prompt, one(*xs)),
    split_micro_batches((prompt_BxP, prompt_valid_BxP, prompt_ids_B), n),
  )
  return jax.tree.map(flat, join_micro_batches(out))


def sequence_logp(
  model: model_lib.ModelConfig,
  params: PyTree,
  rows: Rows,
  micro_batch: int = 0,
  chunk: int = 0,
  field: str = 'train.micro_batch_size',
) -> jax.Array:
  """log pi(y | x) of each row, summed over its generated tokens only; `micro_batch` rows
  at a time when > 0, and log-probs `chunk` positions at a time when > 0 (same values)."""

  def one(rows: Rows) -> jax.Array:
    return sampling.sequence_logprobs(
      model,
      params,
      rows.prompt_BxP,
      rows.prompt_valid_BxP,
      rows.tokens_BxG,
      rows.mask_BxG,
      chunk=chunk,
    ).sum(-1)

  return map_micro_batches(one, rows, micro_batch, field)


@struct.dataclass
class PromptGroups:
  """Rows that share their prompts: R responses to each of B prompts, read with the prompt
  once (`sampling.grouped_sequence_logprobs`)."""

  prompt_BxP: jax.Array
  prompt_valid_BxP: jax.Array
  tokens_BxRxG: jax.Array
  mask_BxRxG: jax.Array


def group_by_prompt(rows: Rows, per_prompt: int, extra: Rows | None = None) -> PromptGroups:
  """`rows` (prompt-major, `per_prompt` to a prompt) and, when given, `extra` (one row per
  prompt, in prompt order) as groups of R = per_prompt (+ 1) responses; response j < per_prompt
  of prompt b is row b * per_prompt + j, response per_prompt is extra's row b."""
  grid = lambda x: x.reshape(-1, per_prompt, *x.shape[1:])
  tokens_BxRxG, mask_BxRxG = grid(rows.tokens_BxG), grid(rows.mask_BxG)
  if extra is not None:
    tokens_BxRxG = jnp.concatenate([tokens_BxRxG, extra.tokens_BxG[:, None]], axis=1)
    mask_BxRxG = jnp.concatenate([mask_BxRxG, extra.mask_BxG[:, None]], axis=1)
  first = lambda x: grid(x)[:, 0]  # each prompt from its first row (a reshape, not a gather)
  return PromptGroups(
    first(rows.prompt_BxP), first(rows.prompt_valid_BxP), tokens_BxRxG, mask_BxRxG
  )


def split_groups(x_BxR: jax.Array, per_prompt: int) -> tuple[jax.Array, jax.Array | None]:
  """Values of `group_by_prompt`'s responses [B, R] as (`rows`' [B * per_prompt] in row
  order, `extra`'s [B] or None)."""
  extra = x_BxR[:, per_prompt] if x_BxR.shape[1] > per_prompt else None
  return x_BxR[:, :per_prompt].reshape(-1), extra


def grouped_logp(
  model: model_lib.ModelConfig,
  params: PyTree,
  groups: PromptGroups,
  micro_batch: int = 0,
  chunk: int = 0,
  field: str = 'train.micro_batch_size',
) -> jax.Array:
  """log pi(y | x) of each response [B, R], summed over its generated tokens only, each
  prompt read once; `micro_batch` prompts (with all their responses) at a time when > 0, and
  log-probs `chunk` positions at a time when > 0 (same values as `sequence_logp` of the rows)."""

  def one(g: PromptGroups) -> jax.Array:
    return sampling.grouped_sequence_logprobs(
      model, params, g.prompt_BxP, g.prompt_valid_BxP, g.tokens_BxRxG, g.mask_BxRxG, chunk=chunk
    ).sum(-1)

  return map_micro_batches(one, groups, micro_batch, field)


def best_of(rows: Rows, rewards_BxA: jax.Array, n: int) -> Rows:
  """The best of the first n samples of each prompt (ties: the lowest index), one row each."""
  num_prompts, per_prompt = rewards_BxA.shape
  best_B = objectives.best_of(rewards_BxA[:, :n])
  pick = lambda x: x.reshape(num_prompts, per_prompt, *x.shape[1:])[jnp.arange(num_prompts), best_B]
  return jax.tree.map(pick, rows)
