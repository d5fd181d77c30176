"""Fast hierarchical attention of H-Transformer-1D (Zhu & Soricut, 2021).

Same pair rule as `hattention.reference` (block size b, padded length
T' = b * 2**M): query t sees key s at level

  l(t, s) = min { l : |t // (b * 2**l) - s // (b * 2**l)| <= 1 },

with the key averaged over the aligned cell of 2**l positions holding s, the
cell weighing as many times as it has real keys and carrying the sum of their
values. Nothing of size [length, length] is built:

* Level 0: each query block i (b positions) against key blocks i - 1, i (and
  i + 1 when bidirectional), exact, the diagonal block causally masked.
* Level l >= 1: cells of 2**l positions, blocks of b cells. Query block i sees
  the coarse blocks i - 1 (and i + 1) only; of block i - 1 a query in the left
  half of block i sees the left half only (the right half is adjacent at level
  l - 1), and symmetrically for block i + 1. All coarse keys of block i - 1 lie
  strictly before block i, so the causal rule holds without a mask.

Math and scheduling are apart. `_level0` and `_coarse_level` compute one level
for blocks of query rows against their key windows. The scheduling runs the
queries in chunks of `chunk_size` positions (one chunk when the sequence is
shorter): a chunk sums its own keys into cells level by level (pairwise sums,
`_KeyCells`) and gets from outside only what lies beyond it (`_Side`, per
level): the coarse block just before (and after) its first (last) query block,
for levels whose blocks are longer than a chunk the neighbour blocks of the
block holding it, plus the "sample"/"mean" query row when a cell is longer
than the chunk. Each level's neighbour blocks are concatenated into one key
window per query block: one einsum per level. "sample" and "mean" queries are
one per cell, so level l costs O(L / 2**l) and the levels merge from coarse to
fine, broadcasting the running softmax statistics over the two halves of each
cell: O(L) time and memory. "fine" keeps every query at every level:
O(L log L). Several chunks run in a loop under a custom VJP whose backward pass
recomputes each chunk, so temporaries stay chunk-sized (forward-mode
differentiation then needs a single chunk, i.e. padded length <= chunk_size).

Segments (`segment_ids`) add integer cell summaries: the smallest and largest
segment id of each cell's real keys (a cell is pure when they agree) and, for
"mean", of its non-padding positions. A coarse row of "sample"/"mean" serves
the fine rows of its cell, so it runs for the segment of its cell (the
sampled position's, or the pure id of the cell); while the statistics are
broadcast from a cell to its two halves, a half acting for another segment
drops them, and a fine row drops what its level-1 row gathered for another
segment. With segments that are contiguous runs this is the pair rule exactly.

Levels merge with a per-row running max / log-sum-exp in float32; the maxima
are stop-gradient stabilisers (the output does not depend on them).

A relative position bias table (`relative_bias`, `hattention.relative_position`)
adds one entry per (row, key) of a level's key window: the index depends on the
row's cell within its query block and the key's cell within the window only
(plus, when a query block is longer than the chunk, the chunk's place in it), so
each level gathers a [rows, keys] bias once per chunk, broadcast over blocks.
"""

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hattention import relative_position
from hattention.geometry import QUERY_MODES, level_count, padded_length

_NO_MAX = -1e30  # row max of a row that sees nothing (finite: no inf - inf)
# Row max given to dropped rows in `_merge`: below any row max, so that their weight
# exp(_DROPPED - m) is 0 even beside a row that sees nothing (a select on the weight
# instead made the segment forward 7% slower at 4k).
_DROPPED = 2 * _NO_MAX
_MIXED_KEYS = -1  # segment of a key cell without real keys or with several segments
_MIXED_QUERIES = -2  # "mean": segment of a query cell spanning several segments
_NO_ID_LOW = np.iinfo(np.int32).max  # smallest segment id of a cell that has none


class _Stats(NamedTuple):
  """Unnormalised softmax pieces of a set of rows, all float32.

  m: [..., rows] row max (stop-gradient); s: [..., rows] sum of weights
  exp(logit - m); o: [..., rows, head_dim] weighted sum of values.
  """
  m: jnp.ndarray
  s: jnp.ndarray
  o: jnp.ndarray


class _Config(NamedTuple):
  """Static options of one call."""
  block_size: int
  chunk: int
  num_chunks: int
  levels: int
  causal: bool
  query_mode: str
  scale: float


class _Positions(NamedTuple):
  """Fine positions (the padded sequence or one chunk of it) along axis 2.

  query, key, value: [batch, heads, n, dim] in the compute dtype; real:
  [batch, 1, n] float32, 1 for a real key (key_mask and a nonzero segment);
  segment: [batch, 1, n] int32 segment id (0 on padding), None without
  segment_ids.
  """
  query: jnp.ndarray
  key: jnp.ndarray
  value: jnp.ndarray
  real: jnp.ndarray
  segment: jnp.ndarray | None


class _IdRange(NamedTuple):
  """Smallest and largest segment id per cell, int32 [batch, 1, cells]."""
  low: jnp.ndarray
  high: jnp.ndarray


class _KeyCells(NamedTuple):
  """Sums over the real keys of aligned cells (axis 2 indexes the cells).

  key, value: [batch, heads, cells, dim] float32 sums; count: [batch, 1,
  cells] float32 number of real keys; segments: their id range, or None
  without segment_ids.
  """
  key: jnp.ndarray
  value: jnp.ndarray
  count: jnp.ndarray
  segments: _IdRange | None


class _QueryCells(NamedTuple):
  """"mean" queries of aligned cells: query [batch, heads, cells, dim] float32
  sum of the real queries; segments: id range of the non-padding positions, or
  None without segment_ids."""
  query: jnp.ndarray
  segments: _IdRange | None


class _Keys(NamedTuple):
  """Keys as attended (axis 2 indexes keys or cells).

  key: [batch, heads, n, dim] mean key of each cell, value: [batch, heads, n,
  dim] sum of its values, both in the compute dtype; count: [batch, 1, n]
  float32 number of real keys; segment: [batch, 1, n] int32 segment of the
  cell's real keys (_MIXED_KEYS if none or several), None without segments.
  """
  key: jnp.ndarray
  value: jnp.ndarray
  count: jnp.ndarray
  segment: jnp.ndarray | None


class _Queries(NamedTuple):
  """Query rows of one level: query [batch, heads, rows, dim] in the compute
  dtype; segment [batch, 1, rows] int32, the segment the rows act for (None
  without segment_ids)."""
  query: jnp.ndarray
  segment: jnp.ndarray | None


class _Side(NamedTuple):
  """What a chunk needs from outside itself at one level.

  before, after: _KeyCells of the b cells of the coarse block just before /
  after (after is None when causal): for blocks inside the neighbour chunks,
  the last (first) block of the previous (next) chunk; for blocks longer than
  a chunk, the blocks either side of the block holding the chunk. At level 0
  the _Keys of the b positions of the block before / after the chunk. query:
  the chunk's _Queries row (one per chunk) when a cell is longer than the
  chunk ("sample" and "mean"), else None. `_side_inputs` returns every array with a chunk axis at position 2
  (e.g. before.key: [batch, heads, chunks, b, dim]); a chunk sees it dropped.
  """
  before: _KeyCells | _Keys
  after: _KeyCells | _Keys | None
  query: _Queries | None


def _check_args(query, key, value, block_size, query_mode, key_mask,
                num_levels, segment_ids, chunk_size):
  """Raises ValueError naming the offending argument and its value."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, head_dim], got "
                       f"shape {tuple(x.shape)}")
  if key.shape != query.shape or value.shape != query.shape:
    raise ValueError(f"query/key/value shapes differ: query={tuple(query.shape)}"
                     f" key={tuple(key.shape)} value={tuple(value.shape)}")
  if query.shape[1] < 1:
    raise ValueError(f"length must be >= 1, got query shape {tuple(query.shape)}")
  for name, size in (("block_size", block_size), ("chunk_size", chunk_size)):
    if (not isinstance(size, int) or isinstance(size, bool) or size < 2
        or size & (size - 1)):
      raise ValueError(f"{name} must be a power of two >= 2, got {size!r}")
  if query_mode not in QUERY_MODES:
    raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
  for name, mask in (("key_mask", key_mask), ("segment_ids", segment_ids)):
    if mask is not None and tuple(mask.shape) != tuple(query.shape[:2]):
      raise ValueError(f"{name} must have shape {tuple(query.shape[:2])}, got "
                       f"{tuple(mask.shape)}")
  if segment_ids is not None and not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}")
  if num_levels is not None and (not isinstance(num_levels, int)
                                 or isinstance(num_levels, bool)
                                 or num_levels < 1):
    raise ValueError(f"num_levels must be an int >= 1 or None, got {num_levels!r}")


def _blocks(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[batch, heads, n, ...] -> [batch, heads, n // size, size, ...]."""
  return x.reshape(x.shape[:2] + (x.shape[2] // size, size) + x.shape[3:])


def _unblock(x: jnp.ndarray) -> jnp.ndarray:
  """[batch, heads, blocks, rows, ...] -> [batch, heads, blocks * rows, ...]."""
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _shift(x: jnp.ndarray, offset: int) -> jnp.ndarray:
  """Entry i of the result is entry i + offset of x (zeros outside); axis 2."""
  pad = [(0, 0)] * x.ndim
  if offset < 0:
    pad[2] = (-offset, 0)
    return jnp.pad(x, pad)[:, :, :x.shape[2]]
  pad[2] = (0, offset)
  return jnp.pad(x, pad)[:, :, offset:]


# How each field of a cell summary combines: (pairwise op, reduction over an axis).
_SUM, _MIN, _MAX = (jnp.add, jnp.sum), (jnp.minimum, jnp.min), (jnp.maximum, jnp.max)


def _reduce_cells(cells, reduce):
  """Coarser cells of a _KeyCells/_QueryCells: reduce(x, op) on every field.

  Sums add and id ranges widen; op is one of _SUM, _MIN, _MAX.
  """
  def field(x):
    if x is None:
      return None
    if isinstance(x, _IdRange):
      return _IdRange(reduce(x.low, _MIN), reduce(x.high, _MAX))
    return reduce(x, _SUM)
  return type(cells)(*(field(x) for x in cells))


def _pair_cells(cells):
  """Cells of twice the positions: adjacent pairs along axis 2.

  Strided slices, whose transpose is a pad (see `_repeat2`).
  """
  return _reduce_cells(cells, lambda x, op: op[0](x[:, :, 0::2], x[:, :, 1::2]))


def _group_cells(cells, size: int, axis: int = 2):
  """Cells of `size` times the positions: aligned groups along `axis`."""
  if size == 1:
    return cells

  def group(x, op):
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return op[1](x.reshape(shape), axis=axis + 1)
  return _reduce_cells(cells, group)


def _id_range(segment, member) -> _IdRange | None:
  """Per-position id range of the positions where `member` holds (None: no segments)."""
  if segment is None:
    return None
  return _IdRange(jnp.where(member, segment, _NO_ID_LOW), jnp.where(member, segment, 0))


def _fine_cells(x: _Positions, query_mode: str):
  """(_KeyCells, _QueryCells or None) of single positions."""
  weight = x.real[..., None]
  keys = _KeyCells(x.key.astype(jnp.float32) * weight, x.value.astype(jnp.float32) * weight,
                   x.real, _id_range(x.segment, x.real > 0))
  if query_mode != "mean":
    return keys, None
  queries = _QueryCells(x.query.astype(jnp.float32) * weight,
                        _id_range(x.segment, None if x.segment is None else x.segment > 0))
  return keys, queries


def _pure_segment(ids: _IdRange | None, mixed: int, nonempty=None):
  """int32 [batch, 1, cells]: the one segment id of each cell, else `mixed`."""
  if ids is None:
    return None
  pure = ids.low == ids.high
  if nonempty is not None:
    pure = pure & nonempty
  return jnp.where(pure, ids.low, mixed)


def _mean(total, count, dtype):
  """Cell means total / count (0 for empty cells), cast to dtype."""
  return (total / jnp.maximum(count, 1.0)[..., None]).astype(dtype)


def _keys(cells: _KeyCells, dtype) -> _Keys:
  """The attended form of key cells: mean keys and value sums in dtype."""
  return _Keys(_mean(cells.key, cells.count, dtype), cells.value.astype(dtype), cells.count,
               _pure_segment(cells.segments, _MIXED_KEYS, cells.count > 0))


def _position_keys(x: _Positions) -> _Keys:
  """The keys of single positions (level 0), as given."""
  segment = None if x.segment is None else jnp.where(x.real > 0, x.segment, _MIXED_KEYS)
  return _Keys(x.key, x.value, x.real, segment)


def _mean_queries(cells: _QueryCells, count, dtype) -> _Queries:
  """"mean" query rows of cells (count: their number of real keys)."""
  return _Queries(_mean(cells.query, count, dtype),
                  _pure_segment(cells.segments, _MIXED_QUERIES))


def _concat(parts, axis: int):
  """Field-wise concatenation of NamedTuples of arrays (None fields stay None)."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)


# ----------------------------------------------------------------------------
# The math of one level: blocks of query rows against their key windows.


def _windows(blocks: jnp.ndarray, offsets) -> jnp.ndarray:
  """Key windows: [b, h, n + e, keys, ...] -> [b, h, n, len(offsets) * keys, ...].

  Window j concatenates blocks j + o for o in offsets (n + e blocks given,
  e = max(offsets)).
  """
  n = blocks.shape[2] - max(offsets)
  return jnp.concatenate([blocks[:, :, o:o + n] for o in offsets], axis=3)


def _attend(q, k, v, allowed, count, scale, bias=None) -> _Stats:
  """Softmax pieces of blocks of query rows against one key window each.

  q: [batch, heads, blocks, rows, dim]; k, v: [batch, heads, blocks, keys,
  dim]; allowed: bool broadcastable to [batch, heads, blocks, rows, keys];
  count: None (each key is one position) or float32 broadcastable to the same,
  the number of real positions a coarse key stands for (k is then their mean
  and v the sum of their values); bias: None or float32 [heads|1, rows, keys],
  added to the scaled logits (the relative position bias).
  Returns _Stats with m, s: [batch, heads, blocks * rows], o: [..., dim].
  """
  logits = jnp.einsum("bhnqd,bhnkd->bhnqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias[None, :, None]
  logits = jnp.where(allowed, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.maximum(logits.max(-1), _NO_MAX))
  p = jnp.exp(logits - m[..., None])
  s = (p if count is None else p * count).sum(-1)
  o = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return _Stats(_unblock(m), _unblock(s), _unblock(o))


def _same_segment(row_segment, key_segment):
  """allowed [..., rows, keys]: row [..., rows] and key [..., keys] segments equal."""
  return row_segment[..., :, None] == key_segment[..., None, :]


def _level0(queries: _Queries, keys: _Keys, cfg: _Config, table) -> _Stats:
  """Exact attention of each query block to itself and its neighbour blocks.

  queries: [batch, heads, n * b] rows; keys: [batch, heads, (n + e) * b]
  single positions, the rows' keys after the block before them (and before
  the block after them when bidirectional, e = 2; e = 1 when causal); table:
  canonical relative bias table or None.
  Returns _Stats over the rows.
  """
  b = cfg.block_size
  offsets = (0, 1) if cfg.causal else (0, 1, 2)
  bias = None
  if table is not None:  # cells counted from the block before the query block
    index = relative_position.relative_index(b + np.arange(b)[:, None],
                                             np.arange(len(offsets) * b)[None], b)
    bias = relative_position.logit_bias(relative_position.level_table(table, 0), index)
  window = lambda x: _windows(_blocks(x, b), offsets)
  if keys.segment is None:
    allowed = window(keys.count > 0)[:, :, :, None, :]  # [batch, 1, n, 1, keys]
  else:
    allowed = _same_segment(_blocks(queries.segment, b), window(keys.segment))
  if cfg.causal:  # the previous block in full, the own block up to the row
    allowed = allowed & (jnp.arange(2 * b)[None] <= jnp.arange(b)[:, None] + b)
  return _attend(_blocks(queries.query, b), window(keys.key), window(keys.value), allowed,
                 None, cfg.scale, bias)


def _coarse_level(queries: _Queries, before: _Keys, after: _Keys | None, left_row,
                  cfg: _Config, bias=None) -> _Stats:
  """Attention of query blocks to their coarse neighbour blocks at a level >= 1.

  queries: [batch, heads, n, rows, ...] query rows by block; before, after:
  the b cells of the coarse block before / after each query block, [batch,
  heads|1, n, b, ...] (after is None when causal); left_row: bool [rows, 1],
  row in the left half of its block; bias: None or float32 [heads|1, rows,
  keys] over the keys before (then after). Of the block before, a left-half row sees
  the left half only (the right half is adjacent one level finer), and
  symmetrically for the block after. Returns _Stats over [batch, heads, n *
  rows] rows.
  """
  left_key = (jnp.arange(cfg.block_size) < cfg.block_size // 2)[None]
  parts = [(before, ~left_row | left_key)]
  if after is not None:
    parts.append((after, left_row | ~left_key))
  keys = _concat([p[0] for p in parts], axis=3)
  halves = jnp.concatenate([p[1] for p in parts], axis=-1)  # [rows, keys]
  count = keys.count[:, :, :, None, :]
  if keys.segment is not None:  # a cell of another segment counts as empty (a select on
    # the mask instead: "fine" forward 1.35x the time without segments, against 1.12x)
    count = jnp.where(_same_segment(queries.segment, keys.segment), count, 0.0)
  return _attend(queries.query, keys.key, keys.value, (count > 0) & halves, count, cfg.scale,
                 bias)


def _repeat2(x: jnp.ndarray) -> jnp.ndarray:
  """Repeats each row twice along axis 2: [b, h, n, ...] -> [b, h, 2n, ...].

  Written as two interleaving pads, whose transpose is a pairwise sum of
  strided slices (the transpose of a broadcast is a reduction over an axis of
  size 2, which XLA's CPU backend runs very slowly).
  """
  def interleave(low, high):
    config = [(0, 0, 0)] * x.ndim
    config[2] = (low, high, 1)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  return interleave(0, 1) + interleave(1, 0)


def _merge(fine: _Stats, coarse: _Stats | None, keep=None) -> _Stats:
  """Softmax pieces over two disjoint key sets, row by row.

  fine: rows [batch, heads, n]; coarse: rows [batch, heads, n] or
  [batch, heads, n // 2], each row then shared by two rows of `fine`; keep:
  None or bool [batch, 1, n], the rows of `fine` that take `coarse` (the others
  give it the row max _DROPPED, hence the weight 0).
  """
  if coarse is None:
    return fine
  if coarse.m.shape[2] != fine.m.shape[2]:
    coarse = _Stats(*(_repeat2(x) for x in coarse))
  coarse_m = coarse.m if keep is None else jnp.where(keep, coarse.m, _DROPPED)
  m = jnp.maximum(fine.m, coarse_m)
  wa, wb = jnp.exp(fine.m - m), jnp.exp(coarse_m - m)
  return _Stats(m, fine.s * wa + coarse.s * wb,
                fine.o * wa[..., None] + coarse.o * wb[..., None])


def _takes_coarser(rows, coarser_rows, cfg: _Config):
  """keep of `_merge`: the rows act for the segment of the coarser row above them.

  rows, coarser_rows: segment [batch, 1, n] and [batch, 1, n or n // 2], or None
  ("fine" rows all act for their own segment: None).
  """
  if rows is None or coarser_rows is None or cfg.query_mode == "fine":
    return None
  if coarser_rows.shape[2] != rows.shape[2]:
    coarser_rows = jnp.repeat(coarser_rows, 2, axis=2)
  return coarser_rows == rows


# ----------------------------------------------------------------------------
# Scheduling: what one chunk of queries computes, and what it gets from outside.


def _chunk_output(c, x: _Positions, side: list, cfg: _Config, table=None):
  """Output rows of one chunk of queries (every level, merged and normalised).

  c: chunk index (traced or int); x: the chunk's positions ([batch, heads,
  chunk, ...]); side: this chunk's `_Side` per level; table: canonical
  relative bias table [levels, 4 b - 1, heads|1] or None. Returns [batch,
  heads, chunk, dim] in x.query's dtype.
  """
  keys, queries = _fine_cells(x, cfg.query_mode)
  local_keys, local_queries = [keys], [queries]  # per level while a cell fits the chunk
  for level in range(1, cfg.levels):
    if 2**level > cfg.chunk:
      break
    local_keys.append(_pair_cells(local_keys[-1]))
    local_queries.append(None if queries is None else _pair_cells(local_queries[-1]))
  stats, coarser = None, None  # coarser: the segments of the rows of `stats`
  for level in reversed(range(1, cfg.levels)):
    rows = _level_queries(level, x, local_keys, local_queries, side[level], cfg)
    level_stats = _chunk_level(c, level, rows, local_keys, side[level], cfg, table)
    stats = _merge(level_stats, stats, _takes_coarser(rows.segment, coarser, cfg))
    coarser = rows.segment
  ext = [side[0].before, _position_keys(x)] + ([] if cfg.causal else [side[0].after])
  level_stats = _level0(_Queries(x.query, x.segment), _concat(ext, axis=2), cfg, table)
  stats = _merge(level_stats, stats, _takes_coarser(x.segment, coarser, cfg))
  out = stats.o / jnp.where(stats.s > 0, stats.s, 1.0)[..., None]
  return out.astype(x.query.dtype)


def _level_queries(level, x: _Positions, local_keys, local_queries, side: _Side,
                   cfg: _Config) -> _Queries:
  """The chunk's query rows at coarse level `level` (one per cell unless "fine")."""
  cell = 2**level
  if cfg.query_mode == "fine":
    return _Queries(x.query, x.segment)
  if cell > cfg.chunk:  # the chunk lies in one cell: its query comes from outside
    return side.query
  if cfg.query_mode == "sample":
    return jax.tree.map(lambda y: y[:, :, ::cell], _Queries(x.query, x.segment))
  return _mean_queries(local_queries[level], local_keys[level].count, x.query.dtype)


def _coarse_bias(table, level: int, row_cell, cfg: _Config):
  """float32 [heads|1, rows, keys] bias of a level's rows against the keys of `_coarse_level`,
  or None without a table. row_cell: int [rows], each row's cell in its query block."""
  if table is None:
    return None
  b = cfg.block_size
  key_cell = np.arange(b) if cfg.causal else np.concatenate([np.arange(b), 2 * b + np.arange(b)])
  index = relative_position.relative_index(b + row_cell[:, None], key_cell[None], b)
  return relative_position.logit_bias(relative_position.level_table(table, level), index)


def _chunk_level(c, level, rows: _Queries, local_keys, side: _Side, cfg: _Config,
                 table) -> _Stats:
  """Stats of one chunk's query rows at coarse level `level` >= 1.

  rows: from `_level_queries`; local_keys: the chunk's key cells per level;
  side: this level's `_Side`; table: canonical relative bias table or None.
  """
  b, chunk, width = cfg.block_size, cfg.chunk, cfg.block_size * 2**level
  dtype = rows.query.dtype
  before = _keys(side.before, dtype)
  after = None if cfg.causal else _keys(side.after, dtype)
  num_rows = rows.query.shape[2]
  if width <= chunk:  # whole blocks in the chunk, neighbours from the side inputs
    n = chunk // width
    own = jax.tree.map(lambda x: _blocks(x, b), _keys(local_keys[level], dtype))
    edge = lambda x: jax.tree.map(lambda y: y[:, :, None], x)
    ext = _concat([edge(before), own] + ([] if after is None else [edge(after)]), axis=2)
    before = jax.tree.map(lambda x: x[:, :, :n], ext)
    after = None if after is None else jax.tree.map(lambda x: x[:, :, 2:], ext)
    per_block = num_rows // n
    left_row = (jnp.arange(per_block) < per_block // 2)[:, None]
    row_cell = np.arange(per_block) * b // per_block
  else:  # the chunk lies in one half of one query block
    n = 1
    before, after = (None if keys is None else jax.tree.map(lambda y: y[:, :, None], keys)
                     for keys in (before, after))
    starts = np.arange(cfg.num_chunks) * chunk
    left = jnp.asarray(starts % width < width // 2)[c]
    left_row = jnp.broadcast_to(left, (num_rows, 1))
    first_cell = jnp.asarray((starts % width) >> level)[c]
    row_cell = first_cell + np.arange(num_rows) * max(chunk >> level, 1) // num_rows
  blocked = jax.tree.map(lambda x: _blocks(x, num_rows // n), rows)
  return _coarse_level(blocked, before, after, left_row, cfg,
                       _coarse_bias(table, level, row_cell, cfg))


def _chunk_edges(cells, width: int, cell: int, cfg: _Config):
  """(before, after): per chunk, the cells of the last (first) `width` positions of
  the previous (next) chunk, [batch, heads|1, chunks, width // cell, ...].

  cells: _KeyCells of single positions (or, with cell = 1, _Keys).
  """
  by_chunk = lambda x: x.reshape(x.shape[:2] + (cfg.num_chunks, cfg.chunk) + x.shape[3:])
  edge = lambda part, offset: jax.tree.map(lambda x: _shift(x, offset), _group_cells(
      jax.tree.map(lambda x: by_chunk(x)[:, :, :, part], cells), cell, axis=3))
  return (edge(slice(cfg.chunk - width, None), -1), edge(slice(0, width), 1))


def _neighbour_blocks(cells: _KeyCells, block, b: int):
  """(before, after): the blocks of b cells either side of block[j], per chunk j."""
  def pick(x, offset):
    x = _blocks(x, b)  # [batch, heads, blocks, b, ...]
    padded = jnp.pad(x, [(0, 0), (0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 3))
    return padded[:, :, block + offset]
  return (jax.tree.map(lambda x: pick(x, 0), cells),
          jax.tree.map(lambda x: pick(x, 2), cells))


def _side_inputs(x: _Positions, cfg: _Config) -> list:
  """Per level, `_Side` of every chunk (chunk axis at position 2).

  x: the padded sequence ([batch, heads, padded, ...]).
  """
  b, chunk = cfg.block_size, cfg.chunk
  fine_keys, fine_queries = _fine_cells(x, cfg.query_mode)
  starts = np.arange(cfg.num_chunks) * chunk
  sides, keys, queries = [], None, None
  for level in range(cfg.levels):
    cell, width = 2**level, b * 2**level
    query = None
    if level == 0:  # raw keys (from the float32 sums, "fine" ran 5-9% slower at 4k)
      before, after = _chunk_edges(_position_keys(x), width, cell, cfg)
    elif width <= chunk:
      before, after = _chunk_edges(fine_keys, width, cell, cfg)
    else:
      if keys is None:  # cell sums of the first level with blocks longer than a chunk
        keys, queries = (None if y is None else _group_cells(y, cell)
                         for y in (fine_keys, fine_queries))
      else:
        keys, queries = (None if y is None else _pair_cells(y) for y in (keys, queries))
      before, after = _neighbour_blocks(keys, starts // width, b)
      if cell > chunk:
        query = _chunk_queries(x, keys, queries, level, starts, cfg)
    sides.append(_Side(before, None if cfg.causal else after, query))
  return sides


def _chunk_queries(x: _Positions, keys: _KeyCells, queries, level, starts, cfg: _Config):
  """"sample"/"mean" (else None): the query row of each chunk's cell of 2**level
  positions, [batch, heads, chunks, 1, dim] (segment [batch, 1, chunks, 1])."""
  if cfg.query_mode == "sample":
    rows = _Queries(x.query, x.segment)
    index = (starts >> level) << level
  elif cfg.query_mode == "mean":
    rows = _mean_queries(queries, keys.count, x.query.dtype)
    index = starts >> level
  else:
    return None
  return jax.tree.map(lambda y: y[:, :, index][:, :, :, None], rows)


def _chunk_args(c, x: _Positions, side, cfg: _Config):
  """The arguments of `_chunk_output` for chunk c (traced) of full arrays."""
  rows = lambda y: jax.lax.dynamic_slice_in_dim(y, c * cfg.chunk, cfg.chunk, axis=2)
  pick = lambda y: jax.lax.dynamic_index_in_dim(y, c, axis=2, keepdims=False)
  return jax.tree.map(rows, x), jax.tree.map(pick, side)


def _split_floats(tree):
  """(float leaves of tree, rebuild): rebuild(floats) puts new float leaves in place;
  rebuild(floats, others=None) also puts None for the other (integer) leaves."""
  leaves, treedef = jax.tree.flatten(tree)
  is_float = [jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves]

  def rebuild(floats, others=leaves):
    floats = iter(floats)
    return treedef.unflatten([next(floats) if f else (None if others is None else other)
                              for f, other in zip(is_float, leaves)])
  return [leaf for leaf, f in zip(leaves, is_float) if f], rebuild


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg: _Config, x: _Positions, side, table):
  """`_chunk_output` of every chunk: [batch, heads, padded, dim] in query's dtype.

  Runs chunk by chunk in a loop; the backward pass recomputes each chunk's
  forward (nothing but the inputs is kept), so temporaries stay chunk-sized.
  table: the canonical relative bias table (every chunk reads all of it) or None.
  """
  def step(c, out):
    out_c = _chunk_output(c, *_chunk_args(c, x, side, cfg), cfg, table)
    return jax.lax.dynamic_update_slice_in_dim(out, out_c, c * cfg.chunk, axis=2)
  return jax.lax.fori_loop(0, cfg.num_chunks, step, jnp.zeros(x.query.shape, x.query.dtype))


def _chunked_fwd(cfg, x, side, table):
  return _chunked(cfg, x, side, table), (x, side, table)


def _chunked_bwd(cfg, residuals, d_out):
  """Per chunk: recompute, pull d_out back, write the chunk's gradients (the
  table's gradient is the sum over chunks).

  Only float inputs get gradients (segment ids are integers: None).
  """
  x, side, table = residuals
  floats, rebuild = _split_floats((x, side))

  def step(c, carry):
    grads, d_table = carry
    args = _chunk_args(c, x, side, cfg)
    args_floats, args_rebuild = _split_floats(args)
    d_out_c = jax.lax.dynamic_slice_in_dim(d_out, c * cfg.chunk, cfg.chunk, axis=2)
    _, pull = jax.vjp(lambda f, t: _chunk_output(c, *args_rebuild(f), cfg, t),
                      args_floats, table)
    d_floats, d_table_c = pull(d_out_c)
    d_x, d_side = args_rebuild(d_floats, others=None)
    rows = lambda g, d: jax.lax.dynamic_update_slice_in_dim(g, d, c * cfg.chunk, axis=2)
    put = lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d, c, axis=2)
    grad_x, grad_side = rebuild(grads, others=None)
    grads = _split_floats((jax.tree.map(rows, grad_x, d_x),
                           jax.tree.map(put, grad_side, d_side)))[0]
    return grads, jax.tree.map(jnp.add, d_table, d_table_c)

  start = ([jnp.zeros_like(f) for f in floats], jax.tree.map(jnp.zeros_like, table))
  grads, d_table = jax.lax.fori_loop(0, cfg.num_chunks, step, start)
  return (*rebuild(grads, others=None), d_table)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def hierarchical_attention(query, key, value, *, block_size: int = 16,
                           causal: bool = True, query_mode: str = "sample",
                           key_mask=None, segment_ids=None,
                           num_levels: int | None = None, chunk_size: int = 512,
                           relative_bias=None):
  """Hierarchical (H-Transformer-1D) attention, exact to `reference.py`'s rule.

  Args:
    query, key, value: [batch, length, heads, head_dim], same shape, any float
      dtype; matmuls run in that dtype with float32 accumulation, softmax
      statistics in float32.
    block_size: the paper's Nr, a power of two >= 2.
    causal: only keys at positions s <= t are seen.
    query_mode: query used at levels l >= 1: "sample" (the query at the first
      position of t's cell of 2**l positions; O(L), strictly causal),
      "fine" (query[t]; O(L log L), strictly causal) or "mean" (the mean of
      the real queries of t's cell, the paper's Eq. 25; O(L)). With
      causal=True, "mean" lets a position see later queries of its cell: it is
      only meant as a leakage ablation and warns.
    key_mask: optional [batch, length] bool, True for real tokens; masked keys
      are never seen (and are left out of the cell means).
    segment_ids: optional [batch, length] int, the segment of each position
      (several sequences packed in one row); 0 (or negative) is padding, which
      is never a key and whose rows return zeros. Query t sees key s at level
      l = l(t, s) only if s is a real key (key_mask, nonzero segment) of t's
      segment and, for l >= 1, every real key of s's level-l cell is in t's
      segment and, on the query side, "sample": the first position of t's
      cell is in t's segment; "mean": every non-padding position of t's cell
      is; "fine": no condition. Nothing of one segment reaches another's
      outputs. Exact to that rule when every segment is one contiguous run of
      positions (for "fine" and "mean" in any layout; "sample" with a segment
      split in several runs may drop some coarse pairs of the rule, never add
      one). `hattention.packing_slot` says where a segment gets exactly its
      outputs alone.
    num_levels: if set, only levels < num_levels are used (1 = block-local
      attention over the diagonal and neighbour blocks).
    chunk_size: query positions per chunk, a power of two (at least 2 *
      block_size is used). Longer sequences run chunk by chunk under a
      recomputing custom VJP so that temporaries stay cache-sized; forward-mode
      differentiation needs a single chunk.
    relative_bias: optional float table of the hierarchical relative position
      bias, [4 * block_size - 1, H] (shared by every level, as in the paper's
      code) or [levels, 4 * block_size - 1, H] (level l reads row
      min(l, levels - 1)); H = heads or 1. A pair (t, s) seen at level l gets
      relative_bias[..., (s >> l) - (t >> l) + 2 * block_size - 1, head]
      added to its scaled logit (`hattention.relative_position`). Differentiable;
      nothing of size [length, length] is built.

  Returns:
    [batch, length, heads, head_dim] in query's dtype. Rows that see no key
    return zeros.
  """
  _check_args(query, key, value, block_size, query_mode, key_mask, num_levels,
              segment_ids, chunk_size)
  table = relative_position.canonical_table(relative_bias, block_size, query.shape[2])
  if causal and query_mode == "mean":
    warnings.warn("hierarchical_attention: causal=True with query_mode='mean' "
                  "leaks future queries within a cell (leakage ablation only)",
                  stacklevel=2)
  batch, length, heads, dim = query.shape
  padded = padded_length(length, block_size)
  levels = level_count(length, block_size, num_levels)
  chunk = min(padded, max(chunk_size, 2 * block_size))
  cfg = _Config(block_size, chunk, padded // chunk, levels, causal, query_mode,
                1.0 / math.sqrt(dim))
  # One head: the batch stands in for the heads axis ([1, batch, ...]), a pure
  # reshape that keeps XLA from copying the inputs into the chunk loop.
  fold = heads == 1

  def prepare(x):  # [batch, length, heads, dim] -> [batch, heads, padded, dim]
    x = x.reshape(1, batch, length, dim) if fold else x.transpose(0, 2, 1, 3)
    return jnp.pad(x, [(0, 0), (0, 0), (0, padded - length), (0, 0)])

  def per_position(x):  # [batch, length] -> [batch, 1, padded] or [1, batch, padded]
    x = jnp.pad(x, [(0, 0), (0, padded - length)])
    return x[None] if fold else x[:, None]

  real = jnp.ones((batch, length), bool) if key_mask is None else key_mask.astype(bool)
  segment = None
  if segment_ids is not None:
    segment = per_position(jnp.maximum(segment_ids.astype(jnp.int32), 0))
    real = real & (segment_ids > 0)
  x = _Positions(prepare(query), prepare(key), prepare(value),
                 per_position(real.astype(jnp.float32)), segment)
  side = _side_inputs(x, cfg)
  if cfg.num_chunks == 1:
    out = _chunk_output(0, x, jax.tree.map(lambda y: y[:, :, 0], side), cfg, table)
  else:
    out = _chunked(cfg, x, side, table)
  out = out[:, :, :length]
  if fold:
    return out.reshape(batch, length, 1, dim)
  return out.transpose(0, 2, 1, 3)
