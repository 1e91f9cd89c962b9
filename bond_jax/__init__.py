"""bond_jax: BOND and J-BOND (Best-of-N Distillation, Sessa et al. 2024) in JAX/Flax.

Subpackages, each naming its public API in its __init__ (docs/ARCHITECTURE.md has the
layers):

  bond_jax.models   the decoder, LoRA, the sampler, Hugging Face and GGUF checkpoints, sharding
  bond_jax.data     tokenizers, prompt streams, rewards (models, programs, text functions)
  bond_jax.algo     Best-of-N math, the objectives, the algorithm registry, the train step
  bond_jax.eval     the evaluation's estimators and table, the exact testbed, plots
  bond_jax.run      runs: config checks, the loop, checkpoints, evaluation, memory plans
  bond_jax.repro    the paper's figures reproduced on the testbed and the tiny task
"""

__version__ = '0.1.0'
