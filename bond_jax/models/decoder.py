"""A Gemma-architecture decoder in Flax Linen, with an explicit KV cache.

One module covers the families in `ModelConfig`: Gemma 1 (RMSNorm with a
(1 + w) scale, RoPE, multi-query / grouped-query attention, GeGLU MLP, tied
embeddings scaled by sqrt(d_model)), Gemma 2 (attention and final-logit
soft-capping, alternating local / global attention, pre- and post-norms,
query scaling by `query_pre_attn_scalar`), Gemma 3 text (QK-norm, separate
RoPE bases for local and global layers, linear RoPE scaling) and a Llama-style
variant (plain RMSNorm scale, SiLU MLP, untied head, Llama 3.1 RoPE scaling,
Qwen2 q/k/v biases). In fp32 it matches transformers' Gemma, Gemma2, Gemma3 text,
Llama and Qwen2 models to ~1e-6 relative (tests/test_hf_parity.py); `bond_jax.hf`
maps their checkpoints onto this module.

The model is pure: parameters come in through `apply`, the KV cache comes in as
an argument and goes out as a result. Every call gets

  tokens_BxT     token ids
  positions_BxT  RoPE position of each token (left padding does not count)
  mask_BxTxS     which cache slots each query may attend to (causality and
                 padding already folded in; see `attention_mask`)
  cache          per-layer {'k', 'v'} arrays of shape [B, S, K, H] (with
                 `scan_layers`, one {'k', 'v'} of shape [L, B, S, K, H]), or None
  cache_index    the slot where this call's T tokens are written

A mask narrower than the cache (S' < S slots) attends to the cache's first S' slots only
(for a caller whose queries need none of the rest, e.g. slots not written yet): a decode
step then reads only the part of the cache in use.

Without a cache, S == T and slots are sequence indices. Slots and positions
differ by a per-row constant (the row's left padding), so a sliding window
measured in slots equals one measured in positions.

With `ModelConfig.scan_layers` the blocks are one `nn.scan` over a stacked parameter tree
('layers/...' with a leading axis of length L, the number of layers) instead of
'layer_0' ... 'layer_{L-1}': the same function, compiled once for all layers, and XLA
holds one layer's temporaries at a time (an unrolled stack lets the CPU compiler keep
several layers' backward buffers alive together). `hf` loads and exports either layout.

Shape suffixes: L layers, B batch, T query length, S key/cache length, D model width,
N query heads, K key/value heads, G = N // K, H head width, F MLP width,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
from flax import linen as nn

from bond_jax.models import layers, sharding
from bond_jax.models import lora as lora_lib
from bond_jax.models.attention import Attention
from bond_jax.models.config import REMAT_POLICIES, ModelConfig
from bond_jax.models.layers import MLP, norm, softcap
from bond_jax.types import PyTree

# Per-layer {'k', 'v'} arrays, or (scan_layers) one dict of arrays stacked over layers.
Cache = list[dict[str, jax.Array]] | dict[str, jax.Array]


# ---------------------------------------------------------------------------
# Helpers for callers: positions and masks from a padding mask.


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
  """RoPE positions: index among the row's real tokens (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(query_slots_T: jax.Array, key_valid_BxS: jax.Array) -> jax.Array:
  """Causal-and-padding mask [B, T, S]: a query at slot q sees valid keys at slots <= q."""
  key_slots_S = jnp.arange(key_valid_BxS.shape[-1])
  causal_TxS = key_slots_S[None, :] <= query_slots_T[:, None]
  return causal_TxS[None] & key_valid_BxS[:, None, :].astype(bool)


def sequence_inputs(valid_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions_BxT, mask_BxTxT) of a whole padded sequence read in one pass (no cache)."""
  return positions_from_mask(valid_BxT), attention_mask(jnp.arange(valid_BxT.shape[-1]), valid_BxT)


def concat_prompt_response(
  prompt_BxP: jax.Array,
  prompt_valid_BxP: jax.Array,
  response_BxG: jax.Array,
  response_mask_BxG: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """(tokens_BxT, valid_BxT), T = P + G: a left-padded prompt followed by its response."""
  tokens_BxT = jnp.concatenate([prompt_BxP, response_BxG], axis=1)
  valid_BxT = jnp.concatenate(
    [prompt_valid_BxP.astype(bool), response_mask_BxG.astype(bool)], axis=1
  )
  return tokens_BxT, valid_BxT


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    stacked = (cfg.num_layers, *shape)
    return {'k': jnp.zeros(stacked, cfg.jnp_dtype), 'v': jnp.zeros(stacked, cfg.jnp_dtype)}
  return [
    {'k': jnp.zeros(shape, cfg.jnp_dtype), 'v': jnp.zeros(shape, cfg.jnp_dtype)}
    for _ in range(cfg.num_layers)
  ]


def repeat_cache(cfg: ModelConfig, cache: Cache, times: int) -> Cache:
  """Each row of a cache `times` times in a row (row b * times + j is row b's copy j), for
  several continuations of one prefill; a stacked cache's batch axis is its second."""
  batch_axis = 1 if cfg.scan_layers else 0  # a stacked cache is [L, B, S, K, H]
  return jax.tree.map(lambda x: jnp.repeat(x, times, axis=batch_axis), cache)


class Block(nn.Module):
  """One layer: (x, this layer's cache) -> (x, its new cache), the signature a scan over
  layers needs (x the carry; the cache and `local_flag` scanned, the rest broadcast)."""

  cfg: ModelConfig
  local: bool | None  # None: the layer type comes in as `local_flag` (see Attention)
  gate_up: bool = False  # the MLP's stacked gate/up kernel (see MLP)

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index, local_flag=None):
    cfg = self.cfg
    h = norm(cfg, 'pre_attn_norm')(x_BxTxD)
    h, new_cache = Attention(cfg, self.local, name='attn')(
      h, positions_BxT, mask_BxTxS, cache, cache_index, local_flag
    )
    if cfg.use_post_norms:
      h = norm(cfg, 'post_attn_norm')(h)
    x_BxTxD = x_BxTxD + h
    h = norm(cfg, 'pre_ffw_norm')(x_BxTxD)
    h = MLP(cfg, self.gate_up, name='mlp')(h)
    if cfg.use_post_norms:
      h = norm(cfg, 'post_ffw_norm')(h)
    return sharding.constrain_batch(x_BxTxD + h), new_cache


class Decoder(nn.Module):
  """The decoder. `__call__` returns (logits_BxTxV float32, new cache or None).
  `gate_up`: each MLP's gate and up kernels stacked as one (the decode layout, see MLP)."""

  cfg: ModelConfig
  gate_up: bool = False

  def setup(self):
    cfg = self.cfg
    self.embedder = nn.Embed(
      cfg.vocab_size,
      cfg.embed_dim,
      dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype,
      # std 1/sqrt(D): after the sqrt(D) input scale, unit-size
      # inputs and unit-size tied logits at init.
      embedding_init=nn.initializers.normal(stddev=cfg.embed_dim**-0.5),
    )
    policy = REMAT_POLICIES[cfg.remat]
    # Inside a scan the loop already keeps XLA from merging the recomputation with the
    # forward pass, so the barrier remat adds by default is not needed (as Flax advises).
    block = (
      Block
      if cfg.remat == 'none'
      else nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    )
    if cfg.scan_layers:
      types = {cfg.layer_type(i) for i in range(cfg.num_layers)}
      self.local_L = jnp.array([cfg.layer_type(i) == 'local' for i in range(cfg.num_layers)])
      self.layers = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
        length=cfg.num_layers,
      )(cfg, None if len(types) > 1 else types == {'local'}, self.gate_up, name='layers')
    else:
      self.blocks = [
        block(cfg, cfg.layer_type(i) == 'local', self.gate_up, name=f'layer_{i}')
        for i in range(cfg.num_layers)
      ]
    self.final_norm = norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
        cfg.vocab_size,
        use_bias=False,
        dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        dot_general=layers.rows_dot_general,
      )

  def hidden(
    self,
    tokens_BxT,
    positions_BxT,
    mask_BxTxS,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    """Final-normed hidden states [B, T, D] and the updated cache."""
    cfg = self.cfg
    # The lookup as nn.Embed does it, from the table gathered over 'fsdp' (else XLA moves
    # the looked-up activations instead); activations stay split over the batch axes.
    table_VxD = sharding.gather_fsdp(self.embedder.embedding, 'embedder/embedding')
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(cfg.jnp_dtype)
    if cfg.scale_embeddings:
      # sqrt(D) rounded through the weights' dtype, as transformers does (in bf16,
      # sqrt(3072) = 55.4256 becomes 55.5), then through the activation dtype.
      scale = jnp.asarray(cfg.embed_dim**0.5, cfg.jnp_param_dtype).astype(cfg.jnp_dtype)
      x_BxTxD = x_BxTxD * scale
    x_BxTxD = sharding.constrain_batch(x_BxTxD)
    if self.cfg.scan_layers:
      x_BxTxD, new_cache = self.layers(
        x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index, self.local_L
      )
      return self.final_norm(x_BxTxD), new_cache
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      layer_cache = cache[i] if cache is not None else None
      x_BxTxD, c = block(x_BxTxD, positions_BxT, mask_BxTxS, layer_cache, cache_index)
      if new_cache is not None:
        new_cache.append(c)
    return self.final_norm(x_BxTxD), new_cache

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final-normed hidden states (see `output_logits`)."""
    if self.cfg.tie_embeddings:
      return output_logits(self.cfg, {'embedder': {'embedding': self.embedder.embedding}}, h_BxTxD)
    logits = self.lm_head(h_BxTxD)
    return softcap(logits.astype(jnp.float32), self.cfg.final_logit_softcap)

  def last_logits(
    self,
    tokens_BxT,
    positions_BxT,
    mask_BxTxS,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    """Logits of the last position only [B, V] (a prefill needs no others), and the cache."""
    h_BxTxD, new_cache = self.hidden(tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index)
    return self.logits(h_BxTxD[:, -1]), new_cache

  def __call__(
    self,
    tokens_BxT,
    positions_BxT,
    mask_BxTxS,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    h_BxTxD, new_cache = self.hidden(tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index)
    return self.logits(h_BxTxD), new_cache


def output_logits(cfg: ModelConfig, params: PyTree, h_BxTxD: jax.Array) -> jax.Array:
  """Float32 logits of hidden states from the parameters alone (a pure function, so callers
  can project a slice of positions at a time): the tied embedding as Flax's `Embed.attend`
  computes it, or the untied `lm_head` as `Dense` does, then Gemma 2's soft cap."""
  dt = cfg.jnp_dtype
  if cfg.tie_embeddings:
    weight_VxD = params['embedder']['embedding']
    logits = jnp.dot(h_BxTxD.astype(dt), weight_VxD.astype(dt).T)
  else:
    weight_DxV = params['lm_head']['kernel']
    logits = jax.lax.dot_general(
      h_BxTxD.astype(dt), weight_DxV.astype(dt), (((h_BxTxD.ndim - 1,), (0,)), ((), ()))
    )
  return softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)


def init_params(cfg: ModelConfig, rng: jax.Array) -> PyTree:
  """Random parameters (a pytree), without running a forward pass on real data."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  return Decoder(cfg).init(rng, tokens, tokens, mask)['params']


def base_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without LoRA adapters: the model a checkpoint, pi_ref or a frozen base is."""
  return dataclasses.replace(cfg, lora=lora_lib.LoraConfig()) if cfg.lora.on else cfg


def init_adapters(cfg: ModelConfig, rng: jax.Array) -> PyTree:
  """Fresh LoRA adapters for `cfg.lora` (a random, b zero), nested as in the model's
  parameters (`lora.split`), without building the base: only the adapters are allocated."""
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  _, adapters = lora_lib.split(abstract)

  def make(path, leaf):
    name = sharding.path_name(path)
    if name.endswith('/b'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
    if sharding.stacked(name):  # one draw per layer, each with its own fan-in
      keys = jax.random.split(key, leaf.shape[0])
      return jax.vmap(lambda k: lora_lib.init_a(k, leaf.shape[1:], leaf.dtype))(keys)
    return lora_lib.init_a(key, leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, adapters)


def forward(
  cfg: ModelConfig, params: PyTree, tokens_BxT: jax.Array, valid_BxT: jax.Array
) -> jax.Array:
  """Full-sequence logits [B, T, V] for left- or right-padded rows (no cache)."""
  positions_BxT, mask_BxTxT = sequence_inputs(valid_BxT)
  logits, _ = Decoder(cfg).apply({'params': params}, tokens_BxT, positions_BxT, mask_BxTxT)
  return logits
