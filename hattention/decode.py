"""Incremental (token by token) causal hierarchical attention for sampling.

Feeding positions 0, 1, 2, ... through `decode_step` reproduces
`hierarchical_attention(..., causal=True)` on the whole sequence for the
"sample" and "fine" query modes ("mean" needs future queries and is refused).

A query at position t sees, at level 0, blocks t//b - 1 and t//b of raw keys
(causally masked), and at each level l >= 1 the b cells of the level-l block
i - 1 with i = t // (b * 2**l), all of them when t is in the right half of its
level-l block and only the left half otherwise (the rest is covered at level
l - 1). A cell of 2**l real keys weighs 2**l times (logit + l * log 2) and
carries its mean value; a relative bias table adds its entry for the slot's
position (level 0) or cell (level l) against the query's. All levels merge in
one float32 softmax.

Only two consecutive blocks per level are ever needed, so the state is a set
of ring buffers of 2 * b slots (block size b, M levels, B batch, H heads, D
head_dim), whatever the position and max_length:

  recent_keys, recent_values: [B, H, 2b, D] in the cache dtype, level 0: the
    raw key/value of position p in slot p mod 2b (blocks t//b - 1 and t//b).
  key_sums, value_sums: [B, H, M - 1, 2b, D] float32, levels l >= 1: slot
    c mod 2b of level l holds the running sum of the keys/values of cell c
    (positions c * 2**l .. (c + 1) * 2**l - 1); it is reset by the first
    position of its cell and accumulated by the following ones. The cells
    read (level-l block i - 1) are complete, so their mean is sum / 2**l.
  queries: [B, H, M - 1, D] in the cache dtype ("sample" mode; M - 1 = 0
    levels wide in "fine" mode): for level l >= 1 the query at position
    (t >> l) << l, the start of the current level-l cell.

Memory: 4b * (1 + 2 (M - 1)) * D elements per (batch, head) plus the sampled
queries, i.e. O(b * M * D) with M = log2(padded_length / b) -- logarithmic
in max_length instead of the O(max_length * D) of a KV cache. A step writes
one slot per level and attends over 2b * M slots (masked), so it costs
O(b * M * D) whatever the position; the jitted step touches no array whose
size depends on max_length except through M.

Capacity: positions 0 .. max_length - 1 (max_length fixes M as the full
forward on a max_length sequence would). A step at a position >= max_length
cannot raise under jit; `decode_step` returns NaN outputs there instead.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from hattention import relative_position
from hattention.geometry import QUERY_MODES, check_power_of_two, level_count
from hattention.softmax import masked_softmax


@dataclasses.dataclass(frozen=True)
class HierarchicalCache:
  """Decoding state; a pytree whose static fields are the configuration.

  Data fields (B batch, H heads, D head_dim, b block size, M levels):
    position: int32 scalar, the position the next `decode_step` writes.
    recent_keys, recent_values: [B, H, 2b, D] level-0 ring buffers of raw
      keys/values in the cache dtype (slot = position mod 2b).
    key_sums, value_sums: [B, H, M - 1, 2b, D] float32 ring buffers of the
      running key/value sums of the level-l cells (slot = cell mod 2b).
    queries: [B, H, M - 1, D] sampled queries per coarse level ("sample"
      mode; zero levels wide in "fine" mode).
  """

  position: jax.Array
  recent_keys: jax.Array
  recent_values: jax.Array
  key_sums: jax.Array
  value_sums: jax.Array
  queries: jax.Array
  block_size: int = 16
  query_mode: str = "sample"
  max_length: int = 0

  @property
  def num_levels(self) -> int:
    return self.key_sums.shape[2] + 1


jax.tree_util.register_dataclass(
    HierarchicalCache,
    data_fields=["position", "recent_keys", "recent_values", "key_sums",
                 "value_sums", "queries"],
    meta_fields=["block_size", "query_mode", "max_length"])


def _check_positive(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")


def _check_config(block_size, query_mode, num_levels) -> None:
  check_power_of_two("block_size", block_size)
  if query_mode not in QUERY_MODES:
    raise ValueError(f"query_mode={query_mode!r} must be one of {QUERY_MODES}")
  if query_mode == "mean":
    raise ValueError("query_mode='mean' cannot be decoded incrementally: "
                     "it uses queries at future positions")
  if num_levels is not None:
    _check_positive("num_levels", num_levels)


def init_cache(batch: int, max_length: int, heads: int, head_dim: int, *,
               block_size: int = 16, query_mode: str = "sample",
               dtype=jnp.float32, num_levels: int | None = None
               ) -> HierarchicalCache:
  """Empty cache for decoding up to `max_length` positions.

  The level count M comes from padded_length(max_length, block_size) (as in
  the full forward), capped at `num_levels` when given. Memory per (batch,
  head): 4 * block_size * head_dim elements of `dtype` (level 0) plus
  4 * block_size * (M - 1) * head_dim float32 sums and (M - 1) * head_dim
  sampled queries -- independent of max_length but for M.
  """
  for name, value in (("batch", batch), ("max_length", max_length),
                      ("heads", heads), ("head_dim", head_dim)):
    _check_positive(name, value)
  _check_config(block_size, query_mode, num_levels)
  levels = level_count(max_length, block_size, num_levels)
  slots = 2 * block_size
  recent = jnp.zeros((batch, heads, slots, head_dim), dtype)
  sums = jnp.zeros((batch, heads, levels - 1, slots, head_dim), jnp.float32)
  sampled = levels - 1 if query_mode == "sample" else 0
  return HierarchicalCache(
      position=jnp.zeros((), jnp.int32),
      recent_keys=recent, recent_values=recent, key_sums=sums,
      value_sums=sums,
      queries=jnp.zeros((batch, heads, sampled, head_dim), dtype),
      block_size=block_size, query_mode=query_mode, max_length=max_length)


def _check_step(cache: HierarchicalCache, query, key, value) -> None:
  batch, heads, _, head_dim = cache.recent_keys.shape
  expected = (batch, 1, heads, head_dim)
  for name, x in (("query", query), ("key", key), ("value", value)):
    if tuple(x.shape) != expected:
      raise ValueError(f"{name}.shape={tuple(x.shape)} must be {expected} "
                       "[batch, 1, heads, head_dim] matching the cache")


def _coarse_levels(cache: HierarchicalCache) -> jax.Array:
  """int32 [M - 1]: the levels 1 .. M - 1 kept as cell sums."""
  return jnp.arange(1, cache.num_levels, dtype=jnp.int32)


def _write_recent(ring: jax.Array, new: jax.Array, position) -> jax.Array:
  """Writes `new` [B, H, D] into slot position mod 2b of `ring` [B, H, 2b, D]."""
  slot = position & (ring.shape[2] - 1)
  return jax.lax.dynamic_update_slice_in_dim(
      ring, new[:, :, None].astype(ring.dtype), slot, axis=2)


def _accumulate(sums: jax.Array, new: jax.Array, position, levels) -> jax.Array:
  """Adds `new` [B, H, D] to the current cell of every coarse level.

  sums: [B, H, M - 1, 2b, D] float32; the slot of level l is (t >> l) mod 2b,
  reset (set to `new`) when t is the first position of its cell.
  """
  slots = jnp.arange(sums.shape[3], dtype=jnp.int32)
  current = slots[None, :] == ((position >> levels) & (sums.shape[3] - 1))[:, None]
  reset = (position & ((1 << levels) - 1)) == 0
  new = new.astype(jnp.float32)[:, :, None, None]
  base = jnp.where(reset[:, None, None], 0.0, sums)
  return jnp.where(current[:, :, None], base + new, sums)


def _sample_queries(cache: HierarchicalCache, query, position, levels):
  """[B, H, M - 1, D]: `query` [B, H, D] stored at levels whose cell starts."""
  if cache.query_mode != "sample":
    return cache.queries
  starts = (position & ((1 << levels) - 1)) == 0
  return jnp.where(starts[:, None], query[:, :, None].astype(cache.queries.dtype),
                   cache.queries)


def _slot_positions(cache: HierarchicalCache, position) -> jax.Array:
  """int32 [2b]: the position each level-0 slot holds once `position` is written."""
  slots = jnp.arange(2 * cache.block_size, dtype=jnp.int32)
  return position - ((position - slots) & (2 * cache.block_size - 1))


def _recent_mask(cache: HierarchicalCache, position) -> jax.Array:
  """bool [2b]: level-0 slots holding positions of blocks t//b - 1 .. t."""
  b = cache.block_size
  stored = _slot_positions(cache, position)
  first = jnp.maximum((position // b) - 1, 0) * b
  return stored >= first


def _coarse_mask(cache: HierarchicalCache, position, levels) -> jax.Array:
  """bool [M - 1, 2b]: the cells of level-l block i - 1 the query sees.

  All b of them when t is in the right half of its level-l block i, the left
  b / 2 otherwise; none while i = 0.
  """
  b = cache.block_size
  shift = int(math.log2(b)) + levels  # [M - 1] log2 of the level block width
  block = position >> shift
  right_half = ((position >> (shift - 1)) & 1) == 1
  seen = jnp.where(right_half, b, b // 2)
  slots = jnp.arange(2 * b, dtype=jnp.int32)
  in_previous = (slots[None, :] // b) == ((block - 1) & 1)[:, None]
  return ((block >= 1)[:, None] & in_previous
          & ((slots[None, :] % b) < seen[:, None]))


def _slot_bias(cache: HierarchicalCache, table, position, levels):
  """float32 ([H, 2b], [H, M - 1, 2b]): the relative bias of the level-0 slots and of the
  coarse slots (cells of level-l block i - 1) for the query at `position`; table: canonical."""
  b = cache.block_size
  slots = jnp.arange(2 * b, dtype=jnp.int32)
  index = relative_position.relative_index(position, _slot_positions(cache, position), b)
  fine = relative_position.logit_bias(relative_position.level_table(table, 0), index)
  block = position >> (int(math.log2(b)) + levels)  # [M - 1] level-l block of the query
  cell = (block - 1)[:, None] * b + slots[None, :] % b  # [M - 1, 2b] cell in each slot
  index = relative_position.relative_index((position >> levels)[:, None], cell, b)
  rows = jnp.minimum(levels, table.shape[0] - 1)[:, None]
  coarse = jnp.moveaxis(table[rows, index], -1, 0)
  return fine, coarse


def _attend(cache: HierarchicalCache, query, position, levels, table=None):
  """One causal row of hierarchical attention; float32 [B, H, D].

  query: [B, H, D] float32, the query at `position` (written already); table:
  canonical relative bias table or None.
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  inv_width = jnp.exp2(-levels.astype(jnp.float32))  # [M - 1] 1 / 2**l
  if cache.query_mode == "sample":
    coarse_q = cache.queries.astype(jnp.float32)
  else:
    coarse_q = jnp.broadcast_to(query[:, :, None], cache.queries.shape[:2]
                                + (cache.num_levels - 1, query.shape[-1]))
  fine = jnp.einsum("bhd,bhsd->bhs", query,
                    cache.recent_keys.astype(jnp.float32)) * scale
  coarse = jnp.einsum("bhld,bhlsd->bhls", coarse_q, cache.key_sums)
  coarse = (coarse * (scale * inv_width)[:, None]
            + (levels.astype(jnp.float32) * math.log(2.0))[:, None])
  if table is not None:
    fine_bias, coarse_bias = _slot_bias(cache, table, position, levels)
    fine, coarse = fine + fine_bias, coarse + coarse_bias
  batch, heads = query.shape[:2]
  logits = jnp.concatenate([fine, coarse.reshape(batch, heads, -1)], axis=-1)
  mask = jnp.concatenate([_recent_mask(cache, position),
                          _coarse_mask(cache, position, levels).reshape(-1)])
  fine_probs, coarse_probs = jnp.split(masked_softmax(logits, mask), [fine.shape[-1]], axis=-1)
  out = jnp.einsum("bhs,bhsd->bhd", fine_probs, cache.recent_values.astype(jnp.float32))
  coarse_probs = coarse_probs.reshape(coarse.shape) * inv_width[:, None]
  return out + jnp.einsum("bhls,bhlsd->bhd", coarse_probs, cache.value_sums)


def decode_step(cache: HierarchicalCache, query, key, value, relative_bias=None):
  """Attends the query at `cache.position` to keys 0..position (inclusive).

  Args:
    cache: from `init_cache` or a previous `decode_step`.
    query, key, value: [batch, 1, heads, head_dim] for the current position.
    relative_bias: optional table of `hierarchical_attention`'s relative_bias
      ([4b - 1, H] or [levels, 4b - 1, H], H = heads or 1), the same numbers.

  Returns:
    (out [batch, 1, heads, head_dim] in query's dtype, updated cache). `out`
    is NaN when the position is >= cache.max_length (capacity exceeded).
  """
  _check_step(cache, query, key, value)
  table = relative_position.canonical_table(relative_bias, cache.block_size, query.shape[2])
  position = cache.position
  levels = _coarse_levels(cache)
  q, k, v = (x[:, 0] for x in (query, key, value))  # [B, H, D]
  cache = dataclasses.replace(
      cache, position=position + 1,
      recent_keys=_write_recent(cache.recent_keys, k, position),
      recent_values=_write_recent(cache.recent_values, v, position),
      key_sums=_accumulate(cache.key_sums, k, position, levels),
      value_sums=_accumulate(cache.value_sums, v, position, levels),
      queries=_sample_queries(cache, q, position, levels))
  out = _attend(cache, q.astype(jnp.float32), position, levels, table)
  out = jnp.where(position < cache.max_length, out, jnp.nan)
  return out[:, None].astype(query.dtype), cache
