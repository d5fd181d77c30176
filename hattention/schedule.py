"""The chunk schedule of hierarchical attention: what one chunk of queries computes, and
what it gets from outside.

The queries run in chunks of `chunk` positions (one chunk when the sequence is shorter). A
chunk sums its own keys into cells level by level (pairwise sums, `cells.pair_cells`) and
gets from outside only what lies beyond it (`Side`, per level): the coarse block just
before (and after) its first (last) query block, for levels whose blocks are longer than a
chunk the neighbour blocks of the block holding it, plus the "sample"/"mean" query row
when a cell is longer than the chunk. "sample" and "mean" queries are one per cell, so
level l costs O(L / 2**l) and the levels merge from coarse to fine, broadcasting the
running softmax statistics over the two halves of each cell: O(L) time and memory.
"fine" keeps every query at every level: O(L log L).

A coarse row of "sample"/"mean" serves the fine rows of its cell, so it runs for the
segment of its cell; while the statistics are broadcast from a cell to its two halves, a
half acting for another segment drops them (`_takes_coarser`).

The relative position bias of a level depends on the row's cell within its query block and
the key's cell within the window only (plus, when a query block is longer than the chunk,
the chunk's place in it), so each level gathers a [rows, keys] bias once per chunk.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hattention import relative_position
from hattention.cells import (Cells, KeyCells, Positions, Queries, attended_keys, blocks,
                              fine_cells, group_cells, mean_queries, pair_cells, position_keys,
                              position_queries)
from hattention.level import Flanks, coarse_level, level0, neighbour_flanks, query_blocks
from hattention.softmax import Stats, merge, normalise


class Config(NamedTuple):
  """Static options of one call: block size, chunk length and count, levels, etc."""
  block_size: int
  chunk: int
  num_chunks: int
  levels: int
  causal: bool
  query_mode: str
  scale: float


class Side(NamedTuple):
  """What a chunk needs from outside itself at one level.

  edges: Flanks of KeyCells, the b cells of the coarse block just before / after the
  chunk's first / last query block (after None when causal): for blocks inside the
  neighbour chunks, the last (first) block of the previous (next) chunk; for blocks
  longer than a chunk, the blocks either side of the block holding the chunk. At level 0
  the Keys of the b positions of the block before / after the chunk. query: the chunk's
  Queries row (one per chunk) when a cell is longer than the chunk ("sample" and "mean"),
  else None. `side_inputs` returns every array with a chunk axis at position 2 (e.g.
  edges.before.key: [batch, heads, chunks, b, dim]); a chunk sees it dropped.
  """
  edges: Flanks
  query: Queries | None


def _shift(x: jnp.ndarray, offset: int) -> jnp.ndarray:
  """Entry i of the result is entry i + offset of x (zeros outside); axis 2."""
  pad = [(0, 0)] * x.ndim
  if offset < 0:
    pad[2] = (-offset, 0)
    return jnp.pad(x, pad)[:, :, :x.shape[2]]
  pad[2] = (0, offset)
  return jnp.pad(x, pad)[:, :, offset:]


def _chunk_edges(cells, width: int, cell: int, cfg: Config) -> Flanks:
  """Per chunk, the cells of the last `width` positions of the previous chunk (before) and
  of the first `width` positions of the next (after), [batch, heads|1, chunks,
  width // cell, ...].

  cells: KeyCells of single positions (or, with cell = 1, Keys).
  """
  by_chunk = lambda x: x.reshape(x.shape[:2] + (cfg.num_chunks, cfg.chunk) + x.shape[3:])
  edge = lambda part, offset: jax.tree.map(lambda x: _shift(x, offset), group_cells(
      jax.tree.map(lambda x: by_chunk(x)[:, :, :, part], cells), cell, axis=3))
  return Flanks(before=edge(slice(cfg.chunk - width, None), -1),
                after=edge(slice(0, width), 1))


def _blocks_beside(cells: KeyCells, block, b: int) -> Flanks:
  """The blocks of b cells either side of block[j], per chunk j."""
  def pick(x, offset):
    padded = jnp.pad(blocks(x, b), [(0, 0), (0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2))
    return padded[:, :, block + 1 + offset]  # + 1: the block of padding in front
  return Flanks(before=jax.tree.map(lambda x: pick(x, -1), cells),
                after=jax.tree.map(lambda x: pick(x, 1), cells))


def _chunk_queries(x: Positions, cells: Cells, level, starts, cfg: Config):
  """"sample"/"mean" (else None): the query row of each chunk's cell of 2**level
  positions, [batch, heads, chunks, 1, dim] (segment [batch, 1, chunks, 1])."""
  if cfg.query_mode == "sample":
    rows = position_queries(x)
    index = (starts >> level) << level
  elif cfg.query_mode == "mean":
    rows = mean_queries(cells.queries, cells.keys.count, x.query.dtype)
    index = starts >> level
  else:
    return None
  return jax.tree.map(lambda y: y[:, :, index][:, :, :, None], rows)


def side_inputs(x: Positions, cfg: Config) -> list[Side]:
  """Per level, the `Side` of every chunk (chunk axis at position 2).

  x: the padded sequence ([batch, heads, padded, ...]).
  """
  b, chunk = cfg.block_size, cfg.chunk
  fine = fine_cells(x, cfg.query_mode)
  starts = np.arange(cfg.num_chunks) * chunk
  sides, cells = [], None  # cells: of the level, once blocks are longer than a chunk
  for level in range(cfg.levels):
    cell, width = 2**level, b * 2**level
    query = None
    if level == 0:  # raw keys (from the float32 sums, "fine" ran 5-9% slower at 4k)
      edges = _chunk_edges(position_keys(x), width, cell, cfg)
    elif width <= chunk:
      edges = _chunk_edges(fine.keys, width, cell, cfg)
    else:
      cells = group_cells(fine, cell) if cells is None else pair_cells(cells)
      edges = _blocks_beside(cells.keys, starts // width, b)
      if cell > chunk:
        query = _chunk_queries(x, cells, level, starts, cfg)
    sides.append(Side(Flanks(edges.before, None if cfg.causal else edges.after), query))
  return sides


def _local_cells(x: Positions, cfg: Config) -> list[Cells]:
  """The chunk's own Cells per level, while a cell fits in the chunk (entry l: 2**l)."""
  local = [fine_cells(x, cfg.query_mode)]
  for level in range(1, cfg.levels):
    if 2**level > cfg.chunk:
      break
    local.append(pair_cells(local[-1]))
  return local


def chunk_output(c, x: Positions, side: list[Side], table, cfg: Config):
  """Output rows of one chunk of queries (every level, merged and normalised).

  c: chunk index (traced or int); x: the chunk's positions ([batch, heads,
  chunk, ...]); side: this chunk's `Side` per level; table: canonical
  relative bias table [levels, 4 b - 1, heads|1] or None. Returns [batch,
  heads, chunk, dim] in x.query's dtype.
  """
  local = _local_cells(x, cfg)
  stats, coarser = None, None  # coarser: the segments of the rows of `stats`
  for level in reversed(range(1, cfg.levels)):
    cells = local[level] if level < len(local) else None
    rows = _level_queries(level, x, cells, side[level], cfg)
    level_stats = _chunk_level(c, level, rows, cells, side[level].edges, table, cfg)
    stats = merge(level_stats, stats, _takes_coarser(rows.segment, coarser, cfg))
    coarser = rows.segment
  stats = merge(_chunk_level0(x, side[0].edges, table, cfg), stats,
                _takes_coarser(x.segment, coarser, cfg))
  return normalise(stats).astype(x.query.dtype)


def _takes_coarser(rows, coarser_rows, cfg: Config):
  """keep of `softmax.merge`: the rows act for the segment of the coarser row above them.

  rows, coarser_rows: segment [batch, 1, n] and [batch, 1, n or n // 2], or None
  ("fine" rows all act for their own segment: None).
  """
  if rows is None or coarser_rows is None or cfg.query_mode == "fine":
    return None
  if coarser_rows.shape[2] != rows.shape[2]:
    coarser_rows = jnp.repeat(coarser_rows, 2, axis=2)
  return coarser_rows == rows


def _level_queries(level, x: Positions, cells: Cells | None, side: Side,
                   cfg: Config) -> Queries:
  """The chunk's query rows at coarse level `level` (one per cell unless "fine").

  cells: the chunk's own cells of 2**level positions, None when a cell is longer than the
  chunk.
  """
  cell = 2**level
  if cfg.query_mode == "fine":
    return position_queries(x)
  if cell > cfg.chunk:  # the chunk lies in one cell: its query comes from outside
    return side.query
  if cfg.query_mode == "sample":
    return jax.tree.map(lambda y: y[:, :, ::cell], position_queries(x))
  return mean_queries(cells.queries, cells.keys.count, x.query.dtype)


def _level_bias(table, level: int, row_cell, key_cell, b: int):
  """float32 [heads|1, rows, keys]: the bias of rows in cells `row_cell` (int [rows], counted
  in the query block) against keys in cells `key_cell` (int [keys], counted from the block
  before it), or None without a table."""
  if table is None:
    return None
  index = relative_position.relative_index(b + row_cell[:, None], key_cell[None], b)
  return relative_position.logit_bias(relative_position.level_table(table, level), index)


def _chunk_level0(x: Positions, edges: Flanks, table, cfg: Config) -> Stats:
  """Stats of one chunk's rows at level 0; edges: the chunk's side keys at level 0."""
  b = cfg.block_size
  own = jax.tree.map(lambda y: blocks(y, b), position_keys(x))
  window = 2 * b if cfg.causal else 3 * b  # the keys of the blocks before, own (, after)
  bias = _level_bias(table, 0, np.arange(b), np.arange(window), b)
  return level0(query_blocks(position_queries(x), b), own, neighbour_flanks(own, edges),
                cfg.scale, bias)


def _chunk_level(c, level, rows: Queries, cells: Cells | None, edges: Flanks, table,
                 cfg: Config) -> Stats:
  """Stats of one chunk's query rows at coarse level `level` >= 1.

  rows: from `_level_queries`; cells: the chunk's own cells of 2**level positions (None
  when longer than the chunk); edges: this level's `Side.edges`; table: canonical
  relative bias table or None.
  """
  b, chunk, width = cfg.block_size, cfg.chunk, cfg.block_size * 2**level
  dtype = rows.query.dtype
  edges = Flanks(before=attended_keys(edges.before, dtype),
                 after=None if cfg.causal else attended_keys(edges.after, dtype))
  num_rows = rows.query.shape[2]
  if width <= chunk:  # whole blocks in the chunk, neighbours from the side inputs
    n = chunk // width
    own = jax.tree.map(lambda x: blocks(x, b), attended_keys(cells.keys, dtype))
    flanks = neighbour_flanks(own, edges)
    per_block = num_rows // n
    left_row = (jnp.arange(per_block) < per_block // 2)[:, None]
    row_cell = np.arange(per_block) * b // per_block
  else:  # the chunk lies in one half of one query block
    n = 1
    one_block = lambda keys: None if keys is None else jax.tree.map(lambda y: y[:, :, None],
                                                                    keys)
    flanks = Flanks(before=one_block(edges.before), after=one_block(edges.after))
    starts = np.arange(cfg.num_chunks) * chunk
    left = jnp.asarray(starts % width < width // 2)[c]
    left_row = jnp.broadcast_to(left, (num_rows, 1))
    first_cell = jnp.asarray((starts % width) >> level)[c]
    row_cell = first_cell + np.arange(num_rows) * max(chunk >> level, 1) // num_rows
  key_cell = np.arange(b) if cfg.causal else np.concatenate([np.arange(b), 2 * b + np.arange(b)])
  bias = _level_bias(table, level, row_cell, key_cell, b)
  return coarse_level(query_blocks(rows, num_rows // n), flanks, left_row, cfg.scale, bias)
