"""How far the LoRA anchor (an EMA of the adapter factors) is from the exact EMA anchor.

  python benchmarks/lora_anchor.py [--config=configs/jbond_tiny_lora.py] [--every=25]

With LoRA, Eq. 18 moves the anchor's own adapters: a' = (1 - eta) a + eta a_policy and
b' = (1 - eta) b + eta b_policy, so the anchor is base + a' b' * scale. The EMA of the
policy's weights themselves would be base + EMA(a b) * scale; a product of averages is not
the average of products, so the two differ by the covariance of the factors' moves over
the EMA's horizon. This runs the config's J-BOND steps (the shipped anchor) and keeps the
exact EMA of the folded weights beside it, and every --every steps reports:

  rel_delta       || delta_factors - delta_exact || / || delta_exact || over every targeted
                  kernel (delta: the anchor's weights minus the base's)
  kl_fac_exact    KL(anchor_factors || anchor_exact), from samples of the shipped anchor
  kl_policy_anchor the step's own KL(pi || anchor) estimate, the scale the anchor acts at

Prints one JSON line per report and a last JSON line with all of them.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from bond_jax.algo import state as state_lib
from bond_jax.algo import step as step_lib
from bond_jax.models import decoder as model_lib
from bond_jax.models import lora, sampling
from bond_jax.run import config as config_lib
from bond_jax.run import setup as run_setup


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--config', default='configs/jbond_tiny_lora.py')
  ap.add_argument('--every', type=int, default=25)
  ap.add_argument('--samples', type=int, default=8, help='anchor samples per held-out prompt')
  args = ap.parse_args()
  c = config_lib.load_config_file(args.config)
  config_lib.validate(c)
  setup = run_setup.build(c, run_setup.make_mesh(c))
  cfg, step_cfg, eta = setup.cfg, setup.step_cfg, setup.step_cfg.bond.eta
  if not (cfg.lora.on and step_cfg.bond.anchor == 'ema'):
    sys.exit('error: --config must train LoRA adapters with an EMA anchor')
  base = run_setup.train_reference(c, cfg, config_lib.task(c, cfg))
  adapters = run_setup.trained_params(cfg, base, c.seed)
  rng = run_setup.stream_key(c.seed, run_setup.STATE_STREAM)
  state = state_lib.init_state(step_cfg.bond, adapters, base, setup.tx, rng)
  step = jax.jit(
    lambda s, p, v: step_lib.train_step(s, p, v, cfg=step_cfg, tx=setup.tx, schedule=setup.schedule)
  )
  folded = lambda ad: lora.fold(cfg.lora, lora.attach(base, ad))
  exact = folded(state.anchor_params)  # Eq. 18 on the weights, kept beside the run
  ema = jax.jit(lambda old, new: jax.tree.map(lambda o, n: (1 - eta) * o + eta * n, old, new))
  plain = model_lib.base_config(cfg)
  prompt, valid = setup.eval_prompts
  sp = run_setup.eval_sampling(setup)

  @jax.jit
  def kl_fac_exact(anchor_adapters, exact_params, key):
    fac = lora.attach(base, anchor_adapters)
    out = sampling.sample(cfg, fac, prompt, valid, key, sp, args.samples)
    rep = lambda x: jnp.repeat(x, args.samples, axis=0)
    logp = lambda p, c: sampling.sequence_logprobs(
      c, p, rep(prompt), rep(valid), out.tokens_BxG, out.mask_BxG
    ).sum(-1)
    return jnp.mean(logp(fac, cfg) - logp(exact_params, plain))

  @jax.jit
  def rel_delta(anchor_adapters, exact_params):
    fac = folded(anchor_adapters)
    num = den = 0.0
    for x, y, b in zip(*(jax.tree.leaves(t) for t in (fac, exact_params, base)), strict=True):
      num += jnp.sum((x - y) ** 2)
      den += jnp.sum((y - b) ** 2)
    return jnp.sqrt(num / jnp.maximum(den, 1e-30))

  reports = []
  for n in range(1, c.train.num_steps + 1):
    batch = setup.prompts.next_batch()
    state, m = step(state, *batch)
    exact = ema(exact, folded(state.params))
    if n % args.every == 0 or n == c.train.num_steps:
      report = {
        'step': n,
        'rel_delta': float(rel_delta(state.anchor_params, exact)),
        'kl_fac_exact': float(kl_fac_exact(state.anchor_params, exact, jax.random.key(n))),
        'kl_policy_anchor': float(m['kl_anchor']),
      }
      reports.append(report)
      print(json.dumps(report), flush=True)
  print(json.dumps({'config': args.config, 'eta': eta, 'reports': reports}))


if __name__ == '__main__':
  main()
