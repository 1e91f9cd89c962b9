"""One train step as a composition of named phases, each a pure function callable alone.

  rollout    sample the policy and (if the algorithm has one) the anchor; score them
  reference  log pi_ref and log pi_anchor of the policy samples (frozen models)
  targets    the chosen algorithm's returns (`algorithms.REGISTRY[bond.algorithm]`)
  quantile   with a learned quantile model (App. B.1), its own BCE step
  update     the loss's gradient w.r.t. the policy only, one optax step; a step with a NaN
             or Inf in its rewards, log-probs, loss or gradients changes nothing
  anchor     move the anchor: EMA (Eq. 18), a hard copy every T steps, or never
  metrics    scalars for the logs

`train_step` is the module-level pure function the trainer jits (with shardings and the
state donated); tests call it un-jitted. `make_train_step` jits it for single-device use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from bond_jax.algo import algorithms
from bond_jax.algo import rollout as rollout_lib
from bond_jax.algo.algorithms import REGISTRY, BondConfig, Targets
from bond_jax.algo.rollout import Rollout
from bond_jax.algo.state import TrainState, check_state
from bond_jax.models import decoder as model_lib
from bond_jax.models import lora, sampling, xla_options
from bond_jax.types import PyTree, RewardFn

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about the step. Hashable; each part checks itself when built."""

  model: model_lib.ModelConfig
  sampling: sampling.SamplingParams
  reward_fn: RewardFn
  bond: BondConfig = BondConfig()
  # Memory knobs: none changes a value (to float32 rounding), only what is held at once.
  sample_micro_batch: int = 0  # prompts sampled and scored at a time (0: the whole batch)
  micro_batch: int = 0  # rows per log-prob pass and per gradient micro-batch (0: all rows)
  logprob_chunk: int = 0  # response positions projected to logits at a time (0: all G)
  # Speed: decode with the weight matrices cast once per step to this dtype (None: as stored).
  decode_dtype: str | None = None
  # Speed: read a prompt once for all of its rows in the update (its policy samples and its
  # Best-of-n row; `sampling.grouped_sequence_logprobs`); False reads each row whole. The
  # same values either way, to float32 rounding; fewer FLOPs, but with scanned layers more
  # memory (the KV caches of all layers are held at once).
  share_prompts: bool = False


def frozen_base(cfg: StepConfig, state: TrainState) -> PyTree | None:
  """With LoRA (`cfg.model.lora`), the frozen base the trained trees are adapters of (pi_ref's
  parameters); without, None (the trained trees are whole models)."""
  return state.ref_params if cfg.model.lora.on else None


def model_params(cfg: StepConfig, state: TrainState, trained: PyTree) -> PyTree:
  """The parameters a model computes with: a trained tree (the policy's, the anchor's) as it
  is, or with LoRA the frozen base with those adapters attached (no copy)."""
  return trained if not cfg.model.lora.on else lora.attach(state.ref_params, trained)


def _anchor_params(cfg: StepConfig, state: TrainState) -> PyTree:
  """The anchor's parameters: its own (adapters) when it moves, pi_ref's when it is fixed."""
  if cfg.bond.keeps_anchor_copy:
    return model_params(cfg, state, state.anchor_params)
  return state.ref_params


def rollout(
  cfg: StepConfig,
  state: TrainState,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  reward_params: PyTree,
  rng_policy: jax.Array,
  rng_anchor: jax.Array,
) -> Rollout:
  """Phase 1: policy samples and (when the algorithm has an anchor) anchor samples, scored."""
  policy_per_prompt, anchor_per_prompt = REGISTRY[cfg.bond.algorithm].samples(cfg.bond)
  draw = functools.partial(
    rollout_lib.draw, cfg.model, cfg.sampling, cfg.reward_fn, reward_params,
    prompt_BxP=prompt_BxP, prompt_valid_BxP=prompt_valid_BxP,
    micro_batch=cfg.sample_micro_batch, decode_dtype=cfg.decode_dtype,
  )  # fmt: skip
  with jax.named_scope('sample_policy'):
    policy, policy_reward_B = draw(
      model_params(cfg, state, state.params), rng=rng_policy, per_prompt=policy_per_prompt
    )
  out = Rollout(
    policy=policy,
    policy_reward_B=policy_reward_B,
    logp_ref_B=jnp.zeros_like(policy_reward_B),
    num_prompts=prompt_BxP.shape[0],
    policy_per_prompt=policy_per_prompt,
  )
  if anchor_per_prompt:
    with jax.named_scope('sample_anchor'):
      anchor, anchor_reward_B = draw(
        _anchor_params(cfg, state), rng=rng_anchor, per_prompt=anchor_per_prompt
      )
    out = out.replace(
      anchor=anchor, anchor_reward_BxA=anchor_reward_B.reshape(-1, anchor_per_prompt)
    )
  return out


def reference(cfg: StepConfig, state: TrainState, rollout: Rollout) -> Rollout:
  """Phase 2: log pi_ref(y) and log pi_anchor(y) of the policy samples (no gradient)."""
  logp = lambda params: rollout_lib.sequence_logp(
    cfg.model, params, rollout.policy, cfg.micro_batch, cfg.logprob_chunk
  )
  with jax.named_scope('reference_logprobs'):
    logp_ref_B = logp(state.ref_params)
    if rollout.anchor is None:
      logp_anchor_B = None
    elif cfg.bond.keeps_anchor_copy:
      logp_anchor_B = logp(_anchor_params(cfg, state))
    else:  # a fixed anchor is pi_ref: one forward serves both
      logp_anchor_B = logp_ref_B
  return rollout.replace(logp_ref_B=logp_ref_B, logp_anchor_B=logp_anchor_B)


def targets(cfg: StepConfig, state: TrainState, rollout: Rollout) -> Targets:
  """Phase 3: the returns of `bond.algorithm`, from the registry."""
  with jax.named_scope('targets'):
    return REGISTRY[cfg.bond.algorithm].targets(cfg.bond, cfg.model, state, rollout)


def quantile_update(
  cfg: StepConfig, state: TrainState, rollout: Rollout, targets: Targets
) -> tuple[PyTree, PyTree, jax.Array] | None:
  """Phase 3b, with a learned quantile model only: its own Adam step on the BCE of Eq. 25
  (`algorithms.quantile_update`); (params, optimizer state, BCE), else None."""
  if not cfg.bond.uses_learned_quantiles:
    return None
  with jax.named_scope('quantile_update'):
    return algorithms.quantile_update(cfg.bond, cfg.model, state, rollout, targets)


def loss_and_grad(
  cfg: StepConfig,
  params: PyTree,
  rollout: Rollout,
  targets: Targets,
  base: PyTree | None = None,
) -> tuple[tuple[jax.Array, Metrics, jax.Array], PyTree]:
  """The algorithm's loss and its gradient w.r.t. the policy, over the rows
  [policy samples; Best-of-n samples]. Returns ((loss, terms, logp_B), grads).

  `params` are what the optimizer trains: the whole policy, or with `base` (the frozen base,
  `frozen_base`) its LoRA adapters, attached to the base for every pass; the gradient is
  w.r.t. `params` alone, so none of the base's is formed.

  When a prompt has two or more of those rows (J-BOND: its policy sample and its Best-of-2
  row), they are read as a group with the prompt once (`cfg.share_prompts`; same values).
  With `cfg.micro_batch` rows at a time: a forward pass gives every row's log pi(y); the
  loss, a function of those, gives its derivative c_i in each one; then the gradient is
  accumulated over micro-batches as sum_i c_i grad log pi(y_i), the chain rule term by term,
  so it is the whole batch's gradient (to float32 rounding) with one micro-batch's
  activations held at a time."""
  num_policy_rows = rollout.policy.tokens_BxG.shape[0]
  num_rows = num_policy_rows + (0 if targets.bon_rows is None else rollout.num_prompts)
  loss_fn = REGISTRY[cfg.bond.algorithm].loss
  # What one log-likelihood pass reads (`data`, split into micro-batches along its first
  # axis), and how its values split into (policy rows', Best-of-n rows' or None).
  per_prompt = rollout.policy_per_prompt
  group = per_prompt + (targets.bon_rows is not None)
  micro = cfg.micro_batch
  if cfg.share_prompts and group > 1 and micro > 0 and micro % group:
    raise ValueError(  # run.config.validate says so first, naming the config fields
      f'micro_batch={micro} must hold whole prompts ({group} rows each) with share_prompts'
    )
  if cfg.share_prompts and group > 1:
    data = rollout_lib.group_by_prompt(rollout.policy, per_prompt, targets.bon_rows)
    read = functools.partial(rollout_lib.grouped_logp, cfg.model, chunk=cfg.logprob_chunk)
    micro = micro // group if micro > 0 else 0
    by_kind = lambda logp_BxR: rollout_lib.split_groups(logp_BxR, per_prompt)
  else:
    data = rollout.policy if targets.bon_rows is None else rollout.policy.concat(targets.bon_rows)
    read = functools.partial(rollout_lib.sequence_logp, cfg.model, chunk=cfg.logprob_chunk)
    by_kind = lambda logp_Y: (
      logp_Y[:num_policy_rows],
      None if targets.bon_rows is None else logp_Y[num_policy_rows:],
    )

  def logp_of(trained, data, micro_batch=0):
    model = trained if base is None else lora.attach(base, trained)
    return read(model, data, micro_batch)

  def loss_of_logps(logp_data):
    logp_B, logp_bon_B = by_kind(logp_data)
    total, terms = loss_fn(cfg.bond, targets, logp_B, logp_bon_B)
    return total, (terms, logp_B)

  n = rollout_lib.num_micro_batches(num_rows, cfg.micro_batch, 'train.micro_batch_size')
  if n == 1:
    objective = lambda params: loss_of_logps(logp_of(params, data))
    (total, (terms, logp_B)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return (total, terms, logp_B), grads

  logp_data = logp_of(jax.lax.stop_gradient(params), data, micro)
  (total, (terms, logp_B)), dloss_dlogp = jax.value_and_grad(loss_of_logps, has_aux=True)(logp_data)

  def accumulate(grads, part):
    data_m, dloss_dlogp_m = part
    surrogate = lambda params: jnp.sum(dloss_dlogp_m * logp_of(params, data_m))
    return jax.tree.map(jnp.add, grads, jax.grad(surrogate)(params)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(
    accumulate, zeros, rollout_lib.split_micro_batches((data, dloss_dlogp), n)
  )
  return (total, terms, logp_B), grads


def nonfinite_flags(
  rollout: Rollout, logp_B: jax.Array, loss: jax.Array, grads: PyTree
) -> dict[str, jax.Array]:
  """Which phase produced a NaN or Inf (bool scalars): rewards (rollout), log-probs
  (reference and update), the loss, the gradients. A NaN reward also poisons the loss
  and gradients, so the earliest flag names the source."""
  finite = lambda *xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs if x is not None]))
  return {
    'nonfinite_rewards': ~finite(rollout.policy_reward_B, rollout.anchor_reward_BxA),
    'nonfinite_logprobs': ~finite(rollout.logp_ref_B, rollout.logp_anchor_B, logp_B),
    'nonfinite_loss': ~finite(loss),
    'nonfinite_grads': ~finite(*jax.tree.leaves(grads)),
  }


def keep_if(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """`new` when `ok`, else `old`, leaf by leaf: a select inside the compiled step (no host
  round trip), so a bad step leaves params, anchor and optimizer state as they were."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def move_anchor(
  bond: BondConfig, anchor_params: PyTree | None, params: PyTree, new_step: jax.Array
) -> PyTree | None:
  """Phase 5: EMA anchor <- (1 - eta) anchor + eta theta (Eq. 18), or anchor <- theta every
  `anchor_period` steps (Algorithm 1); a fixed anchor (pi_ref) and REINFORCE keep none."""
  if not bond.keeps_anchor_copy:
    return None
  if bond.anchor == 'ema':
    return optax.incremental_update(params, anchor_params, bond.eta)
  refresh = (new_step % bond.anchor_period) == 0
  return jax.tree.map(lambda anchor, new: jnp.where(refresh, new, anchor), anchor_params, params)


def metrics(
  bond: BondConfig,
  rollout: Rollout,
  targets: Targets,
  loss: jax.Array,
  terms: Metrics,
  logp_B: jax.Array,
  grads: PyTree,
  learning_rate: jax.Array,
) -> Metrics:
  """Phase 6: the step's scalars (KLs are Monte-Carlo estimates from the policy samples)."""
  generated = jnp.sum(rollout.policy.mask_BxG)
  out = {
    'loss': loss,
    **terms,
    **targets.metrics,
    'reward_policy': jnp.mean(rollout.policy_reward_B),
    'kl_ref': jnp.mean(logp_B - rollout.logp_ref_B),
    'grad_norm': optax.global_norm(grads),
    'learning_rate': learning_rate,
    'policy_length': jnp.mean(jnp.sum(rollout.policy.mask_BxG, axis=-1)),
  }
  if rollout.anchor is not None:
    generated = generated + jnp.sum(rollout.anchor.mask_BxG)
    if bond.keeps_anchor_copy:  # a fixed anchor is pi_ref: its KL is kl_ref
      out['kl_anchor'] = jnp.mean(logp_B - rollout.logp_anchor_B)
  out['generated_tokens'] = generated
  return out


def train_step(
  state: TrainState,
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  reward_params: PyTree = None,
  *,
  cfg: StepConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
) -> tuple[TrainState, Metrics]:
  """One update of the configured algorithm. Returns the new state and scalar metrics.

  The reward is `cfg.reward_fn(reward_params, prompt, valid, response, mask)`. A step whose
  rewards, log-probs, loss or gradients hold a NaN or Inf is skipped: the state keeps its
  params, anchor, optimizer (and quantile model) and only step and RNG advance; the metrics
  carry the `nonfinite_*` flags and `skipped` (1.0).
  """
  check_state(cfg.bond, state)
  rng, rng_policy, rng_anchor = jax.random.split(state.rng, 3)
  samples = rollout(cfg, state, prompt_BxP, prompt_valid_BxP, reward_params, rng_policy, rng_anchor)
  samples = reference(cfg, state, samples)
  returns = targets(cfg, state, samples)
  quantile = quantile_update(cfg, state, samples, returns)
  with jax.named_scope('update'):
    (loss, terms, logp_B), grads = loss_and_grad(
      cfg, state.params, samples, returns, frozen_base(cfg, state)
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    flags = nonfinite_flags(samples, logp_B, loss, grads)
    finite = ~jnp.any(jnp.stack(list(flags.values())))
  new_step = state.step + 1
  trained = dict(
    params=params,
    anchor_params=move_anchor(cfg.bond, state.anchor_params, params, new_step),
    opt_state=opt_state,
  )
  if quantile is not None:
    trained.update(quantile_params=quantile[0], quantile_opt_state=quantile[1])
  untouched = {name: getattr(state, name) for name in trained}
  # The step counter and RNG advance either way: the next step draws a new batch.
  new_state = state.replace(step=new_step, rng=rng, **keep_if(finite, trained, untouched))
  step_metrics = metrics(
    cfg.bond, samples, returns, loss, terms, logp_B, grads, schedule(state.step)
  )
  if quantile is not None:
    step_metrics['quantile_bce'] = quantile[2]
  step_metrics.update({k: v.astype(jnp.float32) for k, v in flags.items()})
  step_metrics['skipped'] = (~finite).astype(jnp.float32)
  return new_state, step_metrics


def make_train_step(
  cfg: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[..., tuple[TrainState, Metrics]]:
  """The jitted step(state, prompt_BxP, prompt_valid_BxP[, reward_params]), state donated."""
  step = functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule)
  return jax.jit(step, donate_argnames='state', compiler_options=xla_options.compiler_options())
