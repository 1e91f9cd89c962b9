"""`xla_options`: which compiles get the CPU's options, and what they are for: the sampler's
decode loop updates its KV cache in place (no copy of a cache array in the compiled loop)."""

import re

import jax
import jax.numpy as jnp
import pytest

from bond_jax.models import decoder as model_lib
from bond_jax.models import presets, sampling, sharding, xla_options


def test_only_cpu_compiles_get_the_cpu_options():
  assert xla_options.compiler_options('cpu') == xla_options.CPU_OPTIONS
  assert xla_options.compiler_options('tpu') == {}
  assert xla_options.compiler_options('gpu') == {}
  assert xla_options.mesh_platform(sharding.make_mesh(1)) == 'cpu'


def _cache_copies(compiled_text: str, shape: tuple[int, ...]) -> int:
  dims = ','.join(map(str, shape))
  return len(re.findall(rf'= f32\[{dims}\]\{{[0-9,]*\}} copy\(', compiled_text))


@pytest.mark.parametrize('num_kv_heads', [1, 2])
def test_the_decode_loop_updates_its_cache_in_place(num_kv_heads):
  """Batch 3, prompt 5, 7 new tokens: the cache arrays are f32[3, 12, K, 8]. Compiled as
  `sampling.sample_jit` compiles (the CPU options), the loop copies none of them. The same
  program without the options copies them (XLA:CPU at the jax of requirements.txt), so
  this checks that the options reach the sampler's compile."""
  cfg = presets.preset(
    'tiny', num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=num_kv_heads,
    head_dim=8,
  )  # fmt: skip
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  prompt = jnp.ones((3, 5), jnp.int32)
  valid = jnp.ones((3, 5), bool)
  sp = sampling.SamplingParams(max_new_tokens=7, eos_id=None)
  args = (cfg, params, prompt, valid, jax.random.PRNGKey(1), sp)
  cache_shape = (3, 12, num_kv_heads, 8)
  with_options = sampling.sample_jit.lower(*args).compile().as_text()
  assert _cache_copies(with_options, cache_shape) == 0
  plain = jax.jit(sampling.sample, static_argnames=('cfg', 'sp', 'num_samples'))
  without = plain.lower(*args).compile().as_text()
  assert _cache_copies(without, cache_shape) > 0, 'XLA:CPU no longer copies: the option may go'
