"""Incremental (token by token) causal hierarchical attention for sampling.

Feeding positions 0, 1, 2, ... through `decode_step` reproduces
`hierarchical_attention(..., causal=True)` on the whole sequence for the
"sample" and "fine" query modes ("mean" needs future queries and is refused).

State kept per level l (block size b, padded capacity P = b * 2**M):

  keys[l], values[l]: [batch, P >> l, heads, head_dim], the mean of key/value
    over each aligned cell of 2**l positions (level 0 holds the raw keys and
    values). Cell c of level l is rewritten at every step that falls in it, as
    the mean of cells 2c and 2c+1 of level l-1; it is final once the cell is
    complete, and the causal rule only ever reads complete cells at l >= 1
    (the coarse blocks a query sees lie strictly before its own block).
  queries: [batch, num_levels - 1, heads, head_dim] ("sample" mode): for
    level l >= 1 the query at position (t >> l) << l, recorded when t is a
    multiple of 2**l.

A query at position t sees, at level 0, blocks t//b - 1 and t//b of raw keys
(causally masked), and at each level l >= 1 the b cells of the level-l block
i - 1 with i = t // (b * 2**l), all of them when t is in the right half of its
level-l block and only the left half otherwise (the rest is covered at level
l - 1). A cell of 2**l real keys weighs 2**l times (logit + l * log 2) and
carries its mean value. All levels merge in one float32 softmax, so a step
costs O(b * M * head_dim) whatever the position.

Capacity: positions 0 .. max_length - 1. A step at a position >= max_length
cannot raise under jit; `decode_step` returns NaN outputs there instead (the
cache writes are clamped by dynamic_update_slice and are meaningless).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from hattention.reference import padded_length

QUERY_MODES = ("sample", "fine")


@dataclasses.dataclass(frozen=True)
class HierarchicalCache:
  """Decoding state; a pytree whose static fields are the configuration.

  Data fields:
    position: int32 scalar, the position the next `decode_step` writes.
    keys, values: tuple over levels of [batch, capacity >> l, heads, head_dim]
      cell means in the cache dtype (capacity = padded_length(max_length)).
    queries: [batch, num_levels - 1, heads, head_dim] sampled queries per
      coarse level ("sample" mode; zero levels wide in "fine" mode).
  """

  position: jax.Array
  keys: tuple
  values: tuple
  queries: jax.Array
  block_size: int = 16
  query_mode: str = "sample"
  max_length: int = 0

  @property
  def num_levels(self) -> int:
    return len(self.keys)


jax.tree_util.register_dataclass(
    HierarchicalCache,
    data_fields=["position", "keys", "values", "queries"],
    meta_fields=["block_size", "query_mode", "max_length"])


def _check_positive(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")


def _check_config(block_size, query_mode, num_levels) -> None:
  if (not isinstance(block_size, int) or block_size < 2
      or block_size & (block_size - 1)):
    raise ValueError(f"block_size={block_size!r} must be a power of two >= 2")
  if query_mode == "mean":
    raise ValueError("query_mode='mean' cannot be decoded incrementally: "
                     "it uses queries at future positions")
  if query_mode not in QUERY_MODES:
    raise ValueError(f"query_mode={query_mode!r} must be one of {QUERY_MODES}")
  if num_levels is not None:
    _check_positive("num_levels", num_levels)


def init_cache(batch: int, max_length: int, heads: int, head_dim: int, *,
               block_size: int = 16, query_mode: str = "sample",
               dtype=jnp.float32, num_levels: int | None = None
               ) -> HierarchicalCache:
  """Empty cache for decoding up to `max_length` positions.

  The level count M comes from padded_length(max_length, block_size) (as in
  the full forward), capped at `num_levels` when given. Memory is about
  4 * padded_length * batch * heads * head_dim elements of `dtype`.
  """
  for name, value in (("batch", batch), ("max_length", max_length),
                      ("heads", heads), ("head_dim", head_dim)):
    _check_positive(name, value)
  _check_config(block_size, query_mode, num_levels)
  capacity = padded_length(max_length, block_size)
  levels = int(math.log2(capacity // block_size))
  if num_levels is not None:
    levels = min(levels, num_levels)
  cells = [capacity >> level for level in range(levels)]
  zeros = lambda n: jnp.zeros((batch, n, heads, head_dim), dtype)
  sampled = levels - 1 if query_mode == "sample" else 0
  return HierarchicalCache(
      position=jnp.zeros((), jnp.int32),
      keys=tuple(zeros(n) for n in cells),
      values=tuple(zeros(n) for n in cells),
      queries=zeros(sampled),
      block_size=block_size, query_mode=query_mode, max_length=max_length)


def _check_step(cache: HierarchicalCache, query, key, value) -> None:
  batch, _, heads, head_dim = cache.keys[0].shape
  expected = (batch, 1, heads, head_dim)
  for name, x in (("query", query), ("key", key), ("value", value)):
    if tuple(x.shape) != expected:
      raise ValueError(f"{name}.shape={tuple(x.shape)} must be {expected} "
                       "[batch, 1, heads, head_dim] matching the cache")


def _write_cells(levels: tuple, new: jax.Array, position) -> tuple:
  """Writes `new` [batch, heads, dim] at `position`; refreshes each coarse cell.

  Returns the updated tuple of per-level cell means.
  """
  dtype = levels[0].dtype
  out = [jax.lax.dynamic_update_slice_in_dim(
      levels[0], new[:, None].astype(dtype), position, axis=1)]
  for level in range(1, len(levels)):
    cell = position >> level
    children = jax.lax.dynamic_slice_in_dim(out[-1], 2 * cell, 2, axis=1)
    mean = children.astype(jnp.float32).mean(axis=1, keepdims=True)
    out.append(jax.lax.dynamic_update_slice_in_dim(
        levels[level], mean.astype(dtype), cell, axis=1))
  return tuple(out)


def _level_candidates(cache: HierarchicalCache, level: int, position):
  """Keys, values, extra log-weight and mask of the cells seen at `level`.

  Returns keys/values [batch, n, heads, dim], log_weight float, mask [n] bool.
  """
  b = cache.block_size
  shift = int(math.log2(b)) + level  # log2 of the level-`level` block width
  block = position >> shift
  if level == 0:
    start = jnp.maximum(block - 1, 0) * b
    width = 2 * b
    mask = start + jnp.arange(width) <= position
  else:
    start = jnp.maximum(block - 1, 0) * b
    width = b
    right_half = (position >> (shift - 1)) & 1
    seen = jnp.where(right_half == 1, b, b // 2)
    mask = (block >= 1) & (jnp.arange(width) < seen)
  keys = jax.lax.dynamic_slice_in_dim(cache.keys[level], start, width, axis=1)
  values = jax.lax.dynamic_slice_in_dim(cache.values[level], start, width,
                                        axis=1)
  return keys, values, level * math.log(2.0), mask


def _level_query(cache: HierarchicalCache, query, level: int):
  """[batch, heads, dim] float32 query used at `level`."""
  if level == 0 or cache.query_mode == "fine":
    return query
  return cache.queries[:, level - 1].astype(jnp.float32)


def _attend(cache: HierarchicalCache, query, position):
  """One causal row of hierarchical attention; float32 [batch, heads, dim]."""
  scale = 1.0 / math.sqrt(query.shape[-1])
  logits, values, masks = [], [], []
  for level in range(cache.num_levels):
    k, v, log_weight, mask = _level_candidates(cache, level, position)
    q = _level_query(cache, query, level)
    logit = jnp.einsum("bhd,bnhd->bhn", q, k.astype(jnp.float32)) * scale
    logits.append(logit + log_weight)
    values.append(v)
    masks.append(mask)
  logits = jnp.concatenate(logits, axis=-1)
  values = jnp.concatenate(values, axis=1).astype(jnp.float32)
  mask = jnp.concatenate(masks)
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = weights.sum(-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhn,bnhd->bhd", probs, values)


def decode_step(cache: HierarchicalCache, query, key, value):
  """Attends the query at `cache.position` to keys 0..position (inclusive).

  Args:
    cache: from `init_cache` or a previous `decode_step`.
    query, key, value: [batch, 1, heads, head_dim] for the current position.

  Returns:
    (out [batch, 1, heads, head_dim] in query's dtype, updated cache). `out`
    is NaN when the position is >= cache.max_length (capacity exceeded).
  """
  _check_step(cache, query, key, value)
  position = cache.position
  q = query[:, 0].astype(jnp.float32)
  keys = _write_cells(cache.keys, key[:, 0], position)
  values = _write_cells(cache.values, value[:, 0], position)
  queries = cache.queries
  if cache.query_mode == "sample" and cache.num_levels > 1:
    levels = jnp.arange(1, cache.num_levels)
    starts = (position & ((1 << levels) - 1)) == 0
    queries = jnp.where(starts[None, :, None, None],
                        query.astype(queries.dtype), queries)
  cache = dataclasses.replace(cache, position=position + 1, keys=keys,
                              values=values, queries=queries)
  out = _attend(cache, q, position)
  out = jnp.where(position < cache.max_length, out, jnp.nan)
  return out[:, None].astype(query.dtype), cache
