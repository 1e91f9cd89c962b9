"""What a config builds before the loop starts: model, prompts, reward, pi_ref, optimizer.

Two kinds of run share one loop (`loop.py`):

  task.name = 'noisy_copy'  the embedded task: prompts and reward from `data/tasks.py`,
                            pi_ref trained here by supervised learning (`sft.py`) as the
                            `reference` block says.
  task.name = 'hf'          a Hugging Face policy (pi_ref = model.hf_checkpoint), its
                            tokenizer, prompts from TFDS or JSONL (`data/prompts.py`), a reward
                            model or programmatic reward (`data/rewards.py`); its config has
                            no task.prompt_len, task.keep_prob or reference block.

Either way the loop sees the same `RunSetup`: static step config, a prompt stream with
a saveable position, evaluation prompts, reward parameters (passed to the step as an
argument, never closed over) and a function that produces pi_ref's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from bond_jax.algo import state as state_lib
from bond_jax.algo import step as step_lib
from bond_jax.algo.step import StepConfig
from bond_jax.data import prompts as data
from bond_jax.data import rewards, tasks
from bond_jax.data import tokenizer as tokenizer_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import hf, sharding, xla_options
from bond_jax.models import sampling as sampling_lib
from bond_jax.run import config as config_lib
from bond_jax.run import sft
from bond_jax.types import PyTree, parameter_free

# Independent random streams derived from config.seed.
SFT_STREAM, STATE_STREAM, DATA_STREAM, EVAL_STREAM, LORA_STREAM = range(5)


def stream_key(seed: int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def log(msg: str) -> None:
  print(f'[bond_jax] {msg}', flush=True)


class TaskPrompts:
  """Prompts of the embedded task: batch i is a pure function of (seed, i).

  Like `data.PromptStream`, it returns this process's rows of the global batch and
  has a JSON position (`state` / `restore`) that checkpoints carry.
  """

  def __init__(self, task: tasks.NoisyCopy, key: jax.Array, global_batch: int):
    self._task, self._key, self._batch, self._index = task, key, global_batch, 0

  def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
    prompt, valid = self._task.prompts(jax.random.fold_in(self._key, self._index), self._batch)
    self._index += 1
    n, i = jax.process_count(), jax.process_index()
    rows = slice(i * self._batch // n, (i + 1) * self._batch // n)
    return np.asarray(prompt)[rows], np.asarray(valid)[rows]

  def state(self) -> dict[str, int]:
    return {'index': self._index}

  def restore(self, state: dict[str, int]) -> None:
    self._index = int(state['index'])


@dataclasses.dataclass
class RunSetup:
  cfg: model_lib.ModelConfig
  step_cfg: StepConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  reward_params: Any  # frozen reward-model parameters, or None
  prompts: Any  # next_batch() -> (prompt_BxP, valid_BxP) of this process; state(); restore()
  eval_prompts: tuple[np.ndarray, np.ndarray]  # (prompt_BxP, valid_BxP), all processes
  reference: Callable[[Any], Any]  # shardings -> pi_ref's parameters, placed on them
  ref_dtype: str | None = None  # dtype pi_ref is kept in (None: the policy's)
  tokenizer: tokenizer_lib.Tokenizer | None = None  # a Hugging Face run's policy tokenizer


def optimizer(c: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with warm-up from the `optim` block."""
  return state_lib.make_optimizer(
    c.optim.learning_rate,
    c.optim.warmup_steps,
    c.optim.b1,
    c.optim.b2,
    c.optim.grad_clip_norm,
    mu_dtype=config_lib.memory_dtype(c, 'optim.mu_dtype'),
  )


def train_reference(
  c: ml_collections.ConfigDict,
  cfg: model_lib.ModelConfig,
  task: tasks.NoisyCopy,
  verbose: bool = False,
) -> PyTree:
  """pi_ref of the embedded task: supervised learning on its noisy demonstrations, a pure
  function of the config's seed, model, task and reference fields."""
  t0 = time.time()
  cfg = model_lib.base_config(cfg)  # pi_ref is a whole model: adapters are the policy's
  progress = lambda i, nll: log(
    f'pi_ref supervised step {i}/{c.reference.sft_steps}: nll {nll:.3f}'
  )
  params, nll = sft.train(
    cfg,
    task.demonstrations,
    stream_key(c.seed, SFT_STREAM),
    steps=c.reference.sft_steps,
    batch_size=c.reference.sft_batch_size,
    learning_rate=c.reference.sft_learning_rate,
    log=progress if verbose else None,
  )
  log(f'pi_ref trained in {time.time() - t0:.0f}s (final nll per token {nll:.3f})')
  return params


def _noisy_copy(c: ml_collections.ConfigDict) -> RunSetup:
  cfg = config_lib.model_config(c)
  task = config_lib.task(c, cfg)
  reward_fn = parameter_free(task.reward)
  step_cfg = config_lib.step_config(c, cfg, reward_fn, config_lib.sampling_params(c))
  tx, schedule = optimizer(c)

  def reference(shardings: Any) -> Any:
    return jax.device_put(train_reference(c, cfg, task, verbose=True), shardings)

  return RunSetup(
    cfg=cfg,
    step_cfg=step_cfg,
    tx=tx,
    schedule=schedule,
    reward_params=None,
    ref_dtype=config_lib.memory_dtype(c, 'model.reference_dtype'),
    prompts=TaskPrompts(task, stream_key(c.seed, DATA_STREAM), c.train.batch_size),
    eval_prompts=tuple(
      np.asarray(x) for x in task.prompts(stream_key(c.seed, EVAL_STREAM), c.eval.num_prompts)
    ),
    reference=reference,
  )


def _hugging_face(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> RunSetup:
  tok = tokenizer_lib.load(
    config_lib.tokenizer_path(c),
    chat_template=c.tokenizer.chat_template,
    eos_token=c.tokenizer.eos_token,
  )
  # The checkpoint's architecture; float32 master weights if asked (Adam steps of lr 3e-6
  # vanish in bfloat16), computing in model.dtype.
  cfg = config_lib.model_config(c)
  tokenizer_lib.check_vocab(tok, cfg.vocab_size, 'model.hf_checkpoint')
  reward_fn, reward_params = rewards.make_reward(c.reward, tok, mesh=mesh)
  sp = dataclasses.replace(
    config_lib.sampling_params(c), eos_id=tok.ids.eos_id, pad_id=tok.ids.pad_id
  )
  step_cfg = config_lib.step_config(c, cfg, reward_fn, sp)
  tx, schedule = optimizer(c)

  def reference(shardings: Any) -> Any:
    log(f'loading pi_ref from {c.model.hf_checkpoint}')
    return hf.load_params(c.model.hf_checkpoint, cfg=cfg, shardings=shardings)[1]

  stream = data.from_config(
    c.data, tok, jax.process_index(), jax.process_count(), c.train.batch_size
  )
  return RunSetup(
    cfg=cfg,
    step_cfg=step_cfg,
    tx=tx,
    schedule=schedule,
    reward_params=reward_params,
    ref_dtype=config_lib.memory_dtype(c, 'model.reference_dtype'),
    prompts=stream,
    eval_prompts=data.eval_prompts(c.data, tok, c.eval.num_prompts),
    reference=reference,
    tokenizer=tok,
  )


def make_mesh(c: ml_collections.ConfigDict, devices: Any = None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'model') mesh of the `mesh` block over `devices` (default: every
  device of every process; a -1 axis takes all remaining ones)."""
  return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.model, devices=devices)


def jit_train_step(
  setup: RunSetup, state_sharding: PyTree, batch_sharding: jax.sharding.NamedSharding
) -> Callable[..., Any]:
  """The train step as the loop runs it (and as the memory planner compiles it): state
  sharded by the rules and donated, prompts split over the batch axes, reward parameters
  where they were placed. Call as step(state, prompt_BxP, valid_BxP, reward_params).
  Traced under `jax.set_mesh`, so the layouts the model states (`sharding.constrain_batch`,
  `sharding.gather_fsdp`) hold."""
  jitted = jax.jit(
    functools.partial(
      step_lib.train_step, cfg=setup.step_cfg, tx=setup.tx, schedule=setup.schedule
    ),
    in_shardings=(state_sharding, batch_sharding, batch_sharding, None),
    out_shardings=(state_sharding, None),
    donate_argnames='state',
    compiler_options=xla_options.compiler_options(xla_options.mesh_platform(batch_sharding.mesh)),
  )
  return OnMesh(jitted, batch_sharding.mesh)


class OnMesh:
  """A jitted function called and lowered under `jax.set_mesh(mesh)` (only those: eager
  arrays made outside it stay on their default device)."""

  def __init__(self, jitted: Any, mesh: jax.sharding.Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args: Any, **kwargs: Any) -> Any:
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def trained_params(cfg: model_lib.ModelConfig, ref_params: PyTree, seed: int) -> PyTree:
  """What the optimizer trains, from pi_ref's parameters: pi_ref's own (full fine-tuning;
  `init_state` copies them), or with `cfg.lora` fresh adapters (b = 0: the policy starts as
  pi_ref exactly), drawn from the config's seed."""
  if not cfg.lora.on:
    return ref_params
  return model_lib.init_adapters(cfg, stream_key(seed, LORA_STREAM))


def abstract_state(setup: RunSetup) -> state_lib.TrainState:
  """Shapes and dtypes of the TrainState (nothing allocated): what checkpoints restore into."""

  def shape():
    base = model_lib.init_params(model_lib.base_config(setup.cfg), jax.random.PRNGKey(0))
    trained = trained_params(setup.cfg, base, 0)
    return state_lib.init_state(
      setup.step_cfg.bond, trained, base, setup.tx, jax.random.PRNGKey(0), setup.ref_dtype
    )

  return jax.eval_shape(shape)


def build(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> RunSetup:
  """The run's static pieces, from a validated config."""
  if c.task.name == 'hf':
    return _hugging_face(c, mesh)
  return _noisy_copy(c)


def eval_sampling(setup: RunSetup) -> sampling_lib.SamplingParams:
  """Evaluation samples come from the models' own distributions (temperature 1, untruncated)."""
  sp = setup.step_cfg.sampling
  return sampling_lib.SamplingParams(
    max_new_tokens=sp.max_new_tokens, eos_id=sp.eos_id, pad_id=sp.pad_id
  )
