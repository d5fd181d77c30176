"""Positions and cells of hierarchical attention: the types, and how cells coarsen.

A cell is an aligned run of 2**l positions. Its key summary (`KeyCells`) holds the float32
sums of its real keys and values, their number and, with segments, the range of their
segment ids; coarser cells come from finer ones by pairwise sums (`pair_cells`) or by
summing aligned groups (`group_cells`). As attended (`Keys`), a cell is its mean key, the
sum of its values, its count and its one segment id. "mean" queries have the same kind of
summary (`QueryCells`) and attended form (`Queries`).

Every array keeps the layout [batch, heads, n, ...] with positions or cells on axis 2;
per-position integers and counts have a heads axis of 1.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MIXED_KEYS = -1  # segment of a key cell without real keys or with several segments
MIXED_QUERIES = -2  # "mean": segment of a query cell spanning several segments
_NO_ID_LOW = np.iinfo(np.int32).max  # smallest segment id of a cell that has none


class Reduction(NamedTuple):
  """How one field of a cell summary combines: two arrays at a time, or over an axis."""
  pairwise: Callable
  over_axis: Callable


SUM = Reduction(jnp.add, jnp.sum)
MIN = Reduction(jnp.minimum, jnp.min)
MAX = Reduction(jnp.maximum, jnp.max)


class Positions(NamedTuple):
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


class IdRange(NamedTuple):
  """Smallest and largest segment id per cell, int32 [batch, 1, cells]."""
  low: jnp.ndarray
  high: jnp.ndarray

  def reduced(self, reduce) -> "IdRange":
    """The range of coarser cells (see `KeyCells.reduced`): lows by min, highs by max."""
    return IdRange(low=reduce(self.low, MIN), high=reduce(self.high, MAX))


def _reduced_range(ids: IdRange | None, reduce) -> IdRange | None:
  return None if ids is None else ids.reduced(reduce)


class KeyCells(NamedTuple):
  """Sums over the real keys of aligned cells (axis 2 indexes the cells).

  key, value: [batch, heads, cells, dim] float32 sums; count: [batch, 1,
  cells] float32 number of real keys; segments: their id range, or None
  without segment_ids.
  """
  key: jnp.ndarray
  value: jnp.ndarray
  count: jnp.ndarray
  segments: IdRange | None

  def reduced(self, reduce) -> "KeyCells":
    """Coarser cells: reduce(x, Reduction) combines the cells of each field; sums add."""
    return KeyCells(key=reduce(self.key, SUM), value=reduce(self.value, SUM),
                    count=reduce(self.count, SUM),
                    segments=_reduced_range(self.segments, reduce))


class QueryCells(NamedTuple):
  """"mean" queries of aligned cells: query [batch, heads, cells, dim] float32
  sum of the real queries; segments: id range of the non-padding positions, or
  None without segment_ids."""
  query: jnp.ndarray
  segments: IdRange | None

  def reduced(self, reduce) -> "QueryCells":
    """Coarser cells (see `KeyCells.reduced`)."""
    return QueryCells(query=reduce(self.query, SUM),
                      segments=_reduced_range(self.segments, reduce))


class Cells(NamedTuple):
  """The key cells of one cell width, and the "mean" query cells (None in other modes)."""
  keys: KeyCells
  queries: QueryCells | None

  def reduced(self, reduce) -> "Cells":
    """Coarser cells of both (see `KeyCells.reduced`)."""
    return Cells(keys=self.keys.reduced(reduce),
                 queries=None if self.queries is None else self.queries.reduced(reduce))


class Keys(NamedTuple):
  """Keys as attended (axis 2 indexes keys or cells).

  key: [batch, heads, n, dim] mean key of each cell, value: [batch, heads, n,
  dim] sum of its values, both in the compute dtype; count: [batch, 1, n]
  float32 number of real keys; segment: [batch, 1, n] int32 segment of the
  cell's real keys (MIXED_KEYS if none or several), None without segments.
  """
  key: jnp.ndarray
  value: jnp.ndarray
  count: jnp.ndarray
  segment: jnp.ndarray | None


class Queries(NamedTuple):
  """Query rows of one level: query [batch, heads, rows, dim] in the compute
  dtype; segment [batch, 1, rows] int32, the segment the rows act for (None
  without segment_ids)."""
  query: jnp.ndarray
  segment: jnp.ndarray | None


def blocks(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[batch, heads, n, ...] -> [batch, heads, n // size, size, ...]."""
  return x.reshape(x.shape[:2] + (x.shape[2] // size, size) + x.shape[3:])


def unblock(x: jnp.ndarray) -> jnp.ndarray:
  """[batch, heads, blocks, rows, ...] -> [batch, heads, blocks * rows, ...]."""
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def concat(parts, axis: int):
  """Field-wise concatenation of NamedTuples of arrays (None fields stay None)."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)


def pair_cells(cells):
  """Cells of twice the positions: adjacent pairs along axis 2 (KeyCells, QueryCells, Cells).

  Strided slices, whose transpose is a pad (see `softmax._repeat2`).
  """
  return cells.reduced(lambda x, op: op.pairwise(x[:, :, 0::2], x[:, :, 1::2]))


def group_cells(cells, size: int, axis: int = 2):
  """Cells of `size` times the positions: aligned groups along `axis` (size 1: as given)."""
  if size == 1:
    return cells

  def group(x, op):
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return op.over_axis(x.reshape(shape), axis=axis + 1)
  return cells.reduced(group)


def _id_range(segment, member) -> IdRange | None:
  """Per-position id range of the positions where `member` holds (None: no segments)."""
  if segment is None:
    return None
  return IdRange(jnp.where(member, segment, _NO_ID_LOW), jnp.where(member, segment, 0))


def fine_cells(x: Positions, query_mode: str) -> Cells:
  """The Cells of single positions (queries only for "mean")."""
  weight = x.real[..., None]
  keys = KeyCells(x.key.astype(jnp.float32) * weight, x.value.astype(jnp.float32) * weight,
                  x.real, _id_range(x.segment, x.real > 0))
  if query_mode != "mean":
    return Cells(keys, None)
  queries = QueryCells(x.query.astype(jnp.float32) * weight,
                       _id_range(x.segment, None if x.segment is None else x.segment > 0))
  return Cells(keys, queries)


def _pure_segment(ids: IdRange | None, mixed: int, nonempty=None):
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


def attended_keys(cells: KeyCells, dtype) -> Keys:
  """The attended form of key cells: mean keys and value sums in dtype."""
  return Keys(_mean(cells.key, cells.count, dtype), cells.value.astype(dtype), cells.count,
              _pure_segment(cells.segments, MIXED_KEYS, cells.count > 0))


def position_keys(x: Positions) -> Keys:
  """The keys of single positions (level 0), as given."""
  segment = None if x.segment is None else jnp.where(x.real > 0, x.segment, MIXED_KEYS)
  return Keys(x.key, x.value, x.real, segment)


def position_queries(x: Positions) -> Queries:
  """The query rows of single positions, each acting for its own segment."""
  return Queries(x.query, x.segment)


def mean_queries(cells: QueryCells, count, dtype) -> Queries:
  """"mean" query rows of cells (count: their number of real keys)."""
  return Queries(_mean(cells.query, count, dtype),
                 _pure_segment(cells.segments, MIXED_QUERIES))
