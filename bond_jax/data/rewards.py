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

'python': a function of text, named by reward.function = 'module:function' (an importable
module) or 'path/to/file.py:function'. It takes the batch's prompts and responses as two
lists of strings (the user's text, template stripped, and the decoded response, special
tokens dropped) and returns one finite float per response:

    def my_reward(prompts: list[str], responses: list[str]) -> list[float]: ...

It runs on the host like re-tokenization (a `jax.pure_callback`, under `shard_map` on a
mesh, so each device scores its own rows). It is called once at start-up on a few held-out
prompts with empty responses, so an import or signature error stops the run before
anything compiles; a wrong length, a non-finite value or an exception later raises
`RewardFunctionError`, whose message is one line naming the function (`failure_line`
finds it in the error JAX raises around a callback). `text_rewards.py` has the shipped
ones.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import pathlib
from collections.abc import Callable, Sequence
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


SOURCES = ('model', 'programmatic', 'python')

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


def on_host(
  host_fn: Callable[..., Any],
  out_shapes: Callable[[int], Any],
  mesh: jax.sharding.Mesh | None,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> Any:
  """`host_fn(prompt_BxP, valid_BxP, response_BxG, mask_BxG)` (numpy in, numpy out) run on
  the host inside a traced function, its outputs shaped `out_shapes(rows)`: a
  `jax.pure_callback`, under `shard_map` on a mesh so each device hands over its own rows
  (devices along 'model' repeat the work)."""

  def on_numpy(*rows: Any) -> Any:
    # The callback is handed jax Arrays: indexing those row by row would dispatch device
    # work from inside the running computation, which can deadlock it (it did on a 2-core
    # CPU). host_fn reads numpy copies.
    return host_fn(*(np.asarray(x) for x in rows))

  def callback(*rows):
    return jax.pure_callback(
      on_numpy, out_shapes(rows[0].shape[0]), *rows, vmap_method='sequential'
    )

  if mesh is not None:
    rows = P(sharding.BATCH_AXES)
    out_specs = jax.tree.map(lambda _: rows, out_shapes(1))
    callback = jax.shard_map(
      callback, mesh=mesh, in_specs=(rows,) * 4, out_specs=out_specs, check_vma=False
    )
  return callback(
    prompt_BxP, prompt_valid_BxP.astype(bool), response_BxG, response_mask_BxG.astype(bool)
  )


def _retokenized_reward(
  cfg: ModelConfig,
  host_fn: Callable,
  max_len: int,
  mesh: jax.sharding.Mesh | None,
  params: PyTree,
  *batch: jax.Array,
) -> jax.Array:
  shapes = lambda b: (
    jax.ShapeDtypeStruct((b, max_len), jnp.int32),
    jax.ShapeDtypeStruct((b, max_len), jnp.bool_),
  )
  tokens_BxT, valid_BxT = on_host(host_fn, shapes, mesh, *batch)
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


# ---------------------------------------------------------------------------
# Python functions of text.


class RewardFunctionError(RuntimeError):
  """A reward.function failed or returned a bad value; the message is one line."""


def load_function(spec: str, field: str = 'reward.function') -> Callable[..., Any]:
  """The function named by 'module:function' or 'path/to/file.py:function'."""
  module_name, sep, name = spec.rpartition(':')
  if not (sep and module_name and name):
    raise ConfigError(
      f"config.{field}={spec!r} is invalid: name a function as 'module:function' or "
      "'path/to/file.py:function'."
    )
  try:
    if module_name.endswith('.py'):
      path = pathlib.Path(module_name)
      if not path.is_file():
        raise ConfigError(f'config.{field}={spec!r} is invalid: no such file {module_name}.')
      loader = importlib.util.spec_from_file_location(path.stem, path)
      module = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(module)
    else:
      module = importlib.import_module(module_name)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 (whatever importing the user's module raised)
    raise ConfigError(
      f'config.{field}={spec!r} is invalid: importing {module_name} failed '
      f'({type(e).__name__}: {_first_line(e)}).'
    ) from e
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ConfigError(f'config.{field}={spec!r} is invalid: {module_name} has no function {name}.')
  return fn


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


class TextReward:
  """Host side of reward.source='python': ids -> strings -> the user's function -> float32,
  checked (one value per response, all finite)."""

  def __init__(self, fn: Callable[..., Any], name: str, tokenizer: tokenizer_lib.Tokenizer):
    self.fn, self.name, self.tokenizer = fn, name, tokenizer

  def fail(self, problem: str) -> RewardFunctionError:
    return RewardFunctionError(f'reward.function={self.name!r} {problem}')

  def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """The user's function on strings, checked; float32[len(responses)]."""
    try:
      out = self.fn(list(prompts), list(responses))
    except Exception as e:  # noqa: BLE001 (the user's code: name it and stop)
      raise self.fail(f'raised {type(e).__name__}: {_first_line(e)}') from e
    try:
      values = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError):
      raise self.fail(
        f'returned {type(out).__name__}, not a list of floats (one per response)'
      ) from None
    if values.shape != (len(responses),):
      got = f'{values.size} values' if values.ndim == 1 else f'an array of shape {values.shape}'
      raise self.fail(f'returned {got} for {len(responses)} responses; return one float each')
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      i = int(bad[0])
      raise self.fail(
        f'returned {values[i]} for response {i} ({responses[i][:60]!r}); rewards must be finite'
      )
    return values.astype(np.float32)

  def __call__(
    self,
    prompt_BxP: np.ndarray,
    prompt_valid_BxP: np.ndarray,
    response_BxG: np.ndarray,
    response_mask_BxG: np.ndarray,
  ) -> np.ndarray:
    tok = self.tokenizer
    rows = zip(prompt_BxP, prompt_valid_BxP, response_BxG, response_mask_BxG, strict=True)
    texts = [(tok.prompt_text(p[pv].tolist()), tok.decode(r[rm].tolist())) for p, pv, r, rm in rows]
    prompts, responses = zip(*texts, strict=True) if texts else ((), ())
    return self.score_texts(prompts, responses)


class _QuietCallbackErrors(logging.Filter):
  """JAX logs a callback's exception with its traceback before re-raising it; ours carry a
  one-line message that the run prints instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], RewardFunctionError))


logging.getLogger('jax._src.callback').addFilter(_QuietCallbackErrors())


def failure_line(e: BaseException) -> str | None:
  """The one-line message of a `RewardFunctionError` inside the error JAX raised for a failed
  callback (its text carries the callback's traceback), or None."""
  marker = f'{RewardFunctionError.__name__}: '
  for line in reversed(str(e).splitlines()):
    if marker in line:
      return line.split(marker, 1)[1].strip()
  return None


def _python_reward(
  host_fn: TextReward, mesh: jax.sharding.Mesh | None, params: PyTree, *batch: jax.Array
) -> jax.Array:
  del params
  return on_host(host_fn, lambda b: jax.ShapeDtypeStruct((b,), jnp.float32), mesh, *batch)


def python_reward(
  spec: str, tokenizer: tokenizer_lib.Tokenizer, mesh: jax.sharding.Mesh | None = None
) -> RewardFn:
  """reward.source='python': the traced reward of the text function named by `spec`."""
  return functools.partial(_python_reward, TextReward(load_function(spec), spec, tokenizer), mesh)


def probe(reward_fn: RewardFn, prompt_BxP: np.ndarray, prompt_valid_BxP: np.ndarray) -> None:
  """For a python reward: call its function once on these prompts with empty responses, and
  raise a one-line ConfigError if it fails or returns a bad value (before anything compiles).
  Other rewards: nothing to do."""
  if not (isinstance(reward_fn, functools.partial) and reward_fn.func is _python_reward):
    return
  b = prompt_BxP.shape[0]
  empty = np.zeros((b, 1), np.int32), np.zeros((b, 1), bool)
  try:
    reward_fn.args[0](np.asarray(prompt_BxP), np.asarray(prompt_valid_BxP, bool), *empty)
  except RewardFunctionError as e:
    raise ConfigError(
      f'{e} (called at start-up on {b} held-out prompts, empty responses).'
    ) from None


def make_reward(
  reward_cfg: ml_collections.ConfigDict,
  policy_tokenizer: tokenizer_lib.Tokenizer,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[RewardFn, Any]:
  """(reward_fn, reward_params) for config `reward`; reward_params is None but for a model.

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
  if r.source == 'python':
    return python_reward(r.get('function', ''), policy_tokenizer, mesh), None
  raise ConfigError(f'config.reward.source={r.source!r} is invalid: one of {SOURCES}.')
