"""Reward sources for Hugging Face policies, chosen by config `reward.source`.

Every reward function has the signature

  reward_fn(reward_params, prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG)
      -> reward_B (float32)

and is traceable. `reward_params` is an argument, never closed over: a jitted
step that closed over a reward model would bake its weights into the program as
constants (compile time, memory, and no sharding). Prompts are left-padded;
responses are the sampler's (pad after EOS, mask True up to and including EOS).

'model': a *ForSequenceClassification checkpoint (`hf.load_reward_params`)
scored by `reward_model.score`, its parameters sharded on the policy's mesh.
- Same vocabulary as the policy (reward.tokenizer_path '' or an identical
  vocabulary): the model reads the prompt and response ids side by side, holes
  (prompt left-padding, the slots after EOS) masked out. It reads up to the last
  valid token, i.e. up to and including EOS when the response finished, and up
  to the last generated token when the buffer cut it off: the model sees the
  difference. Width P + G.
- Another vocabulary: ids -> text with the policy tokenizer (the prompt's
  template and chat markup stripped; specials dropped from the response) -> ids
  with the reward tokenizer (its chat template as a user + assistant turn when
  reward.chat_template, else prompt + response as one string and the reward
  tokenizer's EOS when the response finished), left-padded to reward.max_len
  (longer rows keep BOS and their last tokens: the reward head reads the end).
  This runs on the host in a `jax.pure_callback` with static output shapes; on a
  mesh it runs under `shard_map`, so each device re-tokenizes its own rows
  (devices along 'model' repeat the work; it is small next to the model).

'programmatic': a function of the ids (`PROGRAMMATIC`); it ignores reward_params
(None).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.models import hf, reward_model, sharding
from bond_jax.models.decoder import ModelConfig
from bond_jax.types import ConfigError, PyTree, RewardFn

# ---------------------------------------------------------------------------
# Programmatic rewards.


def _copy_accuracy(
  ids: tokenizer_lib.SpecialIds,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> jax.Array:
  """Fraction of the prompt's tokens (BOS excluded) the response repeats position by position."""
  del params
  p, g = prompt_BxP.shape[1], response_BxG.shape[1]
  start_B = p - jnp.sum(prompt_valid_BxP, axis=-1).astype(jnp.int32)  # first valid slot
  if ids.bos_id is not None:
    first_B = jnp.take_along_axis(prompt_BxP, jnp.minimum(start_B, p - 1)[:, None], -1)[:, 0]
    start_B = start_B + ((first_B == ids.bos_id) & (start_B < p)).astype(jnp.int32)
  length_B = p - start_B
  t_G = jnp.arange(g)
  target_BxG = jnp.take_along_axis(prompt_BxP, jnp.clip(start_B[:, None] + t_G, 0, p - 1), -1)
  hit_BxG = (response_BxG == target_BxG) & response_mask_BxG & (t_G < length_B[:, None])
  return jnp.sum(hit_BxG, -1) / jnp.maximum(length_B, 1).astype(jnp.float32)


def _length_penalty(
  ids: tokenizer_lib.SpecialIds,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> jax.Array:
  """Minus the response length in tokens (EOS included): prefers short answers."""
  del ids, params, prompt_BxP, prompt_valid_BxP, response_BxG
  return -jnp.sum(response_mask_BxG, -1).astype(jnp.float32)


def _terminated(
  ids: tokenizer_lib.SpecialIds,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> jax.Array:
  """1 when the response ended with EOS inside the buffer, else 0."""
  del params, prompt_BxP, prompt_valid_BxP
  return jnp.any((response_BxG == ids.eos_id) & response_mask_BxG, -1).astype(jnp.float32)


PROGRAMMATIC: dict[str, Callable[..., jax.Array]] = {
  'copy_accuracy': _copy_accuracy,
  'length_penalty': _length_penalty,
  'terminated': _terminated,
}


# ---------------------------------------------------------------------------
# Reward models.


def retokenize(
  policy_tok: tokenizer_lib.Tokenizer,
  reward_tok: tokenizer_lib.Tokenizer,
  max_len: int,
  prompt_BxP: np.ndarray,
  prompt_valid_BxP: np.ndarray,
  response_BxG: np.ndarray,
  response_mask_BxG: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """Host side: policy ids -> text -> reward ids, left-padded to max_len (module docstring)."""
  b = prompt_BxP.shape[0]
  tokens_BxT = np.full((b, max_len), reward_tok.ids.pad_id, np.int32)
  valid_BxT = np.zeros((b, max_len), bool)
  for i in range(b):
    prompt = policy_tok.prompt_text(prompt_BxP[i][prompt_valid_BxP[i].astype(bool)].tolist())
    response_ids = response_BxG[i][response_mask_BxG[i].astype(bool)].tolist()
    ended = policy_tok.ids.eos_id in response_ids
    ids = reward_tok.encode_conversation(prompt, policy_tok.decode(response_ids), ended)
    if len(ids) > max_len:
      head = ids[:1] if reward_tok.ids.add_bos else []
      ids = head + ids[len(ids) - (max_len - len(head)) :]
    tokens_BxT[i, max_len - len(ids) :] = ids
    valid_BxT[i, max_len - len(ids) :] = True
  return tokens_BxT, valid_BxT


def _retokenized_reward(
  cfg: ModelConfig,
  host_fn: Callable,
  max_len: int,
  mesh: jax.sharding.Mesh | None,
  params: PyTree,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> jax.Array:
  def callback(*rows):
    b = rows[0].shape[0]
    shapes = (
      jax.ShapeDtypeStruct((b, max_len), jnp.int32),
      jax.ShapeDtypeStruct((b, max_len), jnp.bool_),
    )
    return jax.pure_callback(host_fn, shapes, *rows, vmap_method='sequential')

  if mesh is not None:
    rows = P(sharding.BATCH_AXES)
    callback = jax.shard_map(
      callback, mesh=mesh, in_specs=(rows,) * 4, out_specs=(rows, rows), check_vma=False
    )
  tokens_BxT, valid_BxT = callback(
    prompt_BxP, prompt_valid_BxP.astype(bool), response_BxG, response_mask_BxG.astype(bool)
  )
  return reward_model.score(cfg, params, tokens_BxT, valid_BxT)


def _model_reward(
  reward_cfg: ml_collections.ConfigDict,
  policy_tok: tokenizer_lib.Tokenizer,
  mesh: jax.sharding.Mesh | None,
) -> tuple[RewardFn, Any]:
  r = reward_cfg
  if not r.checkpoint:
    raise ConfigError(
      "config.reward.checkpoint='' is invalid: set it to a local "
      '*ForSequenceClassification checkpoint directory (num_labels=1).'
    )
  try:
    cfg, params = hf.load_reward_params(r.checkpoint, dtype=r.dtype, shardings=mesh)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise ConfigError(f'config.reward.checkpoint={r.checkpoint!r} is invalid: {e}') from e
  reward_tok = policy_tok
  if r.tokenizer_path:
    reward_tok = tokenizer_lib.load(
      r.tokenizer_path,
      chat_template=r.chat_template,
      path_field='reward.tokenizer_path',
      template_field='reward.chat_template',
      eos_field='',
    )
  same = reward_tok is policy_tok or reward_tok.same_vocab(policy_tok)
  if same and r.chat_template:
    raise ConfigError(
      'config.reward.chat_template=True is invalid: the reward model shares the '
      "policy's vocabulary, so it reads the policy's own ids (already in the "
      "policy's template); set it False."
    )
  tokenizer_lib.check_vocab(reward_tok, cfg.vocab_size, 'reward.checkpoint')
  if same:
    return functools.partial(reward_model.score_responses, cfg), params
  if not (isinstance(r.max_len, int) and r.max_len > 0):
    raise ConfigError(
      f'config.reward.max_len={r.max_len!r} is invalid: must be an integer > 0 '
      '(width of the re-tokenized reward-model input).'
    )
  host_fn = functools.partial(retokenize, policy_tok, reward_tok, r.max_len)
  return functools.partial(_retokenized_reward, cfg, host_fn, r.max_len, mesh), params


def make_reward(
  reward_cfg: ml_collections.ConfigDict,
  policy_tokenizer: tokenizer_lib.Tokenizer,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[RewardFn, Any]:
  """(reward_fn, reward_params) for config `reward`; reward_params is None for programmatic.

  mesh: the policy's ('data', 'model') mesh; the reward model's parameters are
  placed with `sharding.param_shardings` on it, and re-tokenization is split along
  'data'. None: default device, no shard_map.
  """
  r = reward_cfg
  if r.source == 'programmatic':
    if r.fn not in PROGRAMMATIC:
      raise ConfigError(f'config.reward.fn={r.fn!r} is invalid: one of {sorted(PROGRAMMATIC)}.')
    return functools.partial(PROGRAMMATIC[r.fn], policy_tokenizer.ids), None
  if r.source == 'model':
    return _model_reward(r, policy_tokenizer, mesh)
  raise ConfigError(
    f"config.reward.source={r.source!r} is invalid: one of ('model', 'programmatic')."
  )
