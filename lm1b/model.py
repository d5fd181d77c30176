"""Decoder-only Transformer language model with hierarchical or full attention.

Pre-LayerNorm blocks: x + Attention(LN(x)), x + MLP(LN(x)); learned token
embeddings; final LayerNorm; untied output projection by default.

Position signals, configured by two independent choices:
- `position_encoding`: a learned table added to the token embeddings
  ("learned"), rotations of queries and keys in every layer ("rotary",
  `lm1b.rotary`: logits depend on relative positions only), or nothing ("none").
- `relative_bias`: a learned bias added to the attention logits, by relative
  position: "hierarchical" (the paper's: a table per layer over the relative
  cell positions of each level, `hattention.relative_position`) or "t5" (full
  attention: one table of distance buckets shared by every layer,
  `lm1b.t5_bias`), or "none". The paper's model has the hierarchical bias as
  its only position signal (gin/lm1b_53m_paper.gin).
Parameters are float32 and carry logical axis names ('vocab', 'embed', 'mlp',
'heads', 'kv', 'length') for `lm1b.partitioning`; activations are computed in
`ModelConfig.dtype` and logits are returned in float32.

Both attention kinds go through `attention_core`, and both keep the sentences
of a packed row (told apart by `segment_ids`) apart. Hierarchical attention
gives a sentence exactly the logits it gets alone when the sentence sits where
`hattention.packing_slot` allows (positions restarting at 0 in each sentence).

Activations carry logical sharding constraints (`nn.with_logical_constraint`):
the residual stream ('batch', 'length', 'embed'), queries/keys/values ('batch',
'length', 'heads', 'kv'), the MLP's hidden units ('batch', 'length', 'mlp')
and the logits ('batch', 'length', 'vocab'). They take effect inside
`lm1b.partitioning.mesh_context` (mesh and rules in context) and are no-ops
elsewhere.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hattention import (decode_step, hierarchical_attention, init_cache, kv_cache_step,
                        level_count)
from hattention.relative_position import table_size
from lm1b import flash_attention, layer_stack, rotary, t5_bias
from lm1b.model_config import ModelConfig

ACTIVATION_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")


def attention_core(query, key, value, config: ModelConfig, segment_ids=None, bias=None,
                   relative_bias=None):
  """Causal self-attention of the kind `config.attention`.

  Args:
    query, key, value: [batch, length, heads, head_dim] in the compute dtype.
    config: model configuration.
    segment_ids: optional [batch, length] int32, 0 on padding; each segment
      attends only to itself (hierarchical: the segment rule of
      `hierarchical_attention`).
    bias: full attention: optional float32 logit bias broadcastable to [batch,
      heads, length, length] (`t5_bias.bias`).
    relative_bias: hierarchical attention: optional float32 table of
      `hierarchical_attention`'s relative_bias.

  Returns:
    [batch, length, heads, head_dim] in query's dtype.
  """
  # Rows the kernel cannot take (the one-token trace of initialisation) and platforms it is not
  # for use XLA's attention; run_config.build refuses a seq_len it cannot take.
  whole_blocks = query.shape[1] % flash_attention.ROW_MULTIPLE == 0
  if (config.attention == "full" and config.full_attention_kernel == "flash" and whole_blocks
      and flash_attention.used_here()):
    return flash_attention.flash_attention(query, key, value, segment_ids,
                                           spec=nn.logical_to_mesh_axes(HEAD_AXES))
  if config.attention == "full":
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        is_causal=True)
  return hierarchical_attention(
      query, key, value, block_size=config.block_size, causal=True,
      query_mode=config.query_mode, segment_ids=segment_ids,
      num_levels=config.num_levels, relative_bias=relative_bias)


def _zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Projection(nn.Module):
  """Affine map contracting the trailing `in_shape` dims of x into `out_shape`.

  kernel: [*in_shape, *out_shape] float32 with logical axis `names`
  (Xavier-uniform over the flattened in/out dims); bias: [*out_shape].
  x [..., *in_shape] -> [..., *out_shape] in `dtype`. The kernel is created
  at its full rank so logical sharding constraints apply during init.
  """

  in_shape: tuple
  out_shape: tuple
  names: tuple
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    init = nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(
        init, self.names), self.in_shape + self.out_shape, jnp.float32)
    bias = self.param("bias", _zeros_init(self.names[n_in:]), self.out_shape,
                      jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    return y + bias.astype(self.dtype)


class Embedding(nn.Module):
  """Lookup table [num, features] float32 with logical axes `names`, N(0, 0.02) init.

  ids [...] int -> [..., features] in `dtype`. Before the lookup the table is constrained to
  be whole along `features` (sharded along `num` only): looking rows up in a table sharded
  along both axes leaves the result sharded along features, and turning that into the
  batch-sharded activation the model needs makes XLA replicate it first (measured with
  benchmarks/sharding.py on a 2x2x2 mesh).
  """

  num: int
  features: int
  names: tuple
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.names)
    self.embedding = self.param("embedding", init, (self.num, self.features), jnp.float32)

  def _table(self):
    table = self.embedding.astype(self.dtype)
    return nn.with_logical_constraint(table, (self.names[0], None))

  def __call__(self, ids):
    return jnp.take(self._table(), ids, axis=0)

  def attend(self, x):
    """x [..., features] -> [..., num]: scores against every row (tied output layer)."""
    return jnp.einsum("...f,nf->...n", x.astype(self.dtype), self._table())


def _bias_table(module: nn.Module, config: ModelConfig, shape: tuple, init) -> jnp.ndarray:
  """`module`'s parameter "relative_bias", float32 [*shape, H] (ModelConfig.relative_bias).

  H is num_heads with logical axis 'heads', or 1 with relative_bias_shared_heads (never
  sharded); the other axes have no logical name. init(key, shape, dtype) draws it.
  """
  shared = config.relative_bias_shared_heads
  names = (None,) * len(shape) + (None if shared else "heads",)
  shape = shape + (1 if shared else config.num_heads,)
  return module.param("relative_bias", nn.with_logical_partitioning(init, names), shape,
                      jnp.float32)


def _hierarchical_bias_init(level_discount: bool):
  """N(0, 0.1) init of a table [levels, ...], minus l * log(2) at level l if level_discount."""
  def init(key, shape, dtype=jnp.float32):
    table = 0.1 * jax.random.normal(key, shape, dtype)
    if level_discount:
      table = table - math.log(2) * jnp.arange(shape[0], dtype=dtype)[:, None, None]
    return table
  return init


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      dtype=config.compute_dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ("embed",)),
      bias_init=_zeros_init(("embed",)))


class SelfAttention(nn.Module):
  """Multi-head causal self-attention; in decode mode one position per call."""

  config: ModelConfig
  decode: bool = False

  def _project(self, x, name):
    """x [batch, length, d_model] -> [batch, length, heads, head_dim]."""
    cfg = self.config
    y = Projection((cfg.d_model,), (cfg.num_heads, cfg.head_dim),
                   ("embed", "heads", "kv"), cfg.compute_dtype, name=name)(x)
    return nn.with_logical_constraint(y, HEAD_AXES)

  def _hierarchical_bias(self):
    """This layer's hierarchical relative bias table (see ModelConfig), or None."""
    cfg = self.config
    if cfg.relative_bias != "hierarchical":
      return None
    shape = (table_size(cfg.block_size),)
    if cfg.relative_bias_per_level:
      shape = (level_count(cfg.max_len, cfg.block_size, cfg.num_levels),) + shape
    init = _hierarchical_bias_init(cfg.relative_bias_level_discount)
    return _bias_table(self, cfg, shape, init)

  def _decode_full(self, query, key, value, bias):
    """One step against a KV cache; query/key/value [batch, 1, heads, head_dim].

    bias: None or float32 [batch|1, heads|1, 1, max_len], the logit bias of this
    position's row. The cache variables are [batch * heads, max_len, head_dim] (see
    `kv_cache_step`).
    """
    cfg = self.config
    shape = (query.shape[0] * cfg.num_heads, cfg.max_len, cfg.head_dim)
    keys = self.variable("cache", "keys", jnp.zeros, shape, cfg.compute_dtype)
    values = self.variable("cache", "values", jnp.zeros, shape,
                           cfg.compute_dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    row_bias = None if bias is None else bias[:, :, 0]
    out, keys.value, values.value = kv_cache_step(keys.value, values.value, query,
                                                  key, value, index.value, row_bias)
    index.value = index.value + 1
    return out

  def _decode_hierarchical(self, query, key, value, relative_bias):
    """One step through the hattention decoding cache."""
    cfg = self.config
    cache = self.variable(
        "cache", "attn", lambda: init_cache(
            query.shape[0], cfg.max_len, cfg.num_heads, cfg.head_dim,
            block_size=cfg.block_size, query_mode=cfg.query_mode,
            dtype=cfg.compute_dtype, num_levels=cfg.num_levels))
    out, cache.value = decode_step(cache.value, query, key, value,
                                   relative_bias=relative_bias)
    return out

  @nn.compact
  def __call__(self, x, rotation=None, bias=None, segment_ids=None):
    """x: [batch, length, d_model] -> [batch, length, d_model] (compute dtype).

    rotation: `rotary.rotation` of the positions, applied to queries and keys
    ("rotary" positions), or None. bias: full attention's float32 logit bias
    [batch|1, heads|1, length, keys] ("t5", see `DecoderLM`), or None.
    """
    cfg = self.config
    query, key, value = (self._project(x, n) for n in ("query", "key", "value"))
    if rotation is not None:
      query, key = rotary.apply(query, rotation), rotary.apply(key, rotation)
    relative_bias = self._hierarchical_bias()
    if not self.decode:
      out = attention_core(query, key, value, cfg, segment_ids, bias, relative_bias)
    elif x.shape[1] != 1:
      raise ValueError(f"decode mode takes one position per call, got inputs "
                       f"of length {x.shape[1]}")
    elif cfg.attention == "full":
      out = self._decode_full(query, key, value, bias)
    else:
      out = self._decode_hierarchical(query, key, value, relative_bias)
    return Projection((cfg.num_heads, cfg.head_dim), (cfg.d_model,),
                      ("heads", "kv", "embed"), cfg.compute_dtype,
                      name="out")(out)


class MLP(nn.Module):
  """Position-wise feed-forward block: Dense(d_ff), GELU, dropout, Dense(d_model)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    h = Projection((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"),
                   cfg.compute_dtype, name="wi")(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return Projection((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"),
                      cfg.compute_dtype, name="wo")(h)


class DecoderBlock(nn.Module):
  """Pre-LayerNorm residual block of attention then MLP."""

  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, rotation, bias, segment_ids, deterministic: bool):
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    h = _layer_norm(cfg, "ln_attention")(x)
    h = SelfAttention(cfg, self.decode, name="attention")(h, rotation, bias, segment_ids)
    x = x + dropout(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    h = _layer_norm(cfg, "ln_mlp")(x)
    h = MLP(cfg, name="mlp")(h, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class DecoderLM(nn.Module):
  """Decoder-only language model.

  In decode mode (`decode=True`) each call consumes one position per row,
  inputs [batch, 1] with `positions` [batch, 1], and advances the attention
  caches held in the mutable "cache" collection (all rows share one step
  counter, so rows must be fed in lock step from position 0: `positions` are
  then the cache slots, which the "t5" bias measures distances from).
  """

  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, inputs, *, positions=None, segment_ids=None,
               deterministic: bool = True):
    """Next-token logits.

    Args:
      inputs: [batch, length] int32 token ids.
      positions: optional [batch, length] int32 (default 0..length-1);
        required in decode mode.
      segment_ids: optional [batch, length] int32, 1, 2, ... per sentence and
        0 on padding.
      deterministic: disables dropout when True.

    Returns:
      [batch, length, vocab_size] float32 logits.
    """
    cfg = self.config
    if positions is None:
      if self.decode:
        raise ValueError("positions are required in decode mode")
      positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    embed = Embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"),
                      cfg.compute_dtype, name="token_embed")
    x, rotation = embed(inputs), None
    if cfg.position_encoding == "learned":
      x = x + Embedding(cfg.max_len, cfg.d_model, ("length", "embed"), cfg.compute_dtype,
                        name="position_embed")(positions)
    elif cfg.position_encoding == "rotary":
      rotation = rotary.rotation(positions, cfg.head_dim)
    bias = self._t5_bias(positions) if cfg.relative_bias == "t5" else None
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    x = layer_stack.apply_layers(DecoderBlock, cfg, self.decode, x, rotation, bias,
                                 segment_ids, deterministic)
    x = _layer_norm(cfg, "ln_final")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Projection((cfg.d_model,), (cfg.vocab_size,),
                          ("embed", "vocab"), cfg.compute_dtype,
                          name="output")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)

  def _t5_bias(self, positions):
    """float32 logit bias of the model's T5 table: [1, H, length, length] over row indices, or
    in decode mode [batch, H, 1, max_len] of `positions` [batch, 1] against the cache slots
    (H: heads or 1)."""
    cfg = self.config
    table = _bias_table(self, cfg, (t5_bias.NUM_BUCKETS,), nn.initializers.normal(0.1))
    if self.decode:
      return t5_bias.bias(table, positions, jnp.arange(cfg.max_len))
    rows = jnp.arange(positions.shape[1])
    return t5_bias.bias(table, rows[None], rows)


def count_params(config: ModelConfig) -> int:
  """Number of parameters of `DecoderLM(config)`, from shapes only (no allocation)."""
  model = DecoderLM(config)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  leaves = jax.tree_util.tree_leaves(nn.unbox(shapes["params"]))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))
