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

The queries run in chunks of CHUNK positions (one chunk when the sequence is
shorter). A chunk computes the cell sums of its own keys level by level (pairwise
sums) and gets from outside only what lies beyond it: per level the coarse block
just before (and after) its first (last) query block, and for levels whose
blocks are longer than a chunk the neighbour blocks of the block holding it
(plus the "sample"/"mean" query when a cell is longer than a chunk). Each
level's neighbour blocks are concatenated into one key window per query block:
one einsum per level. A cell's logit uses the mean key, its weight in the
softmax is its count and its value is the sum of its values. "sample" and "mean"
queries are one per cell, so level l costs O(L / 2**l) and the levels merge from
coarse to fine, broadcasting the running softmax statistics over the two halves
of each cell: O(L) time and memory. "fine" keeps every query at every level:
O(L log L). Several chunks run in a loop under a custom VJP whose backward pass
recomputes each chunk, so temporaries stay chunk-sized (forward-mode
differentiation then needs a single chunk, i.e. padded length <= CHUNK).

Levels merge with a per-row running max / log-sum-exp in float32; the maxima
are stop-gradient stabilisers (the output does not depend on them).
"""

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

QUERY_MODES = ("sample", "fine", "mean")
_NO_MAX = -1e30  # row max of a row that sees nothing (finite: no inf - inf)
# Positions per chunk of queries (a power of two). Longer sequences run chunk by
# chunk so that every temporary stays small (cache-sized); tests shrink it.
CHUNK = 512


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


def _check_args(query, key, value, block_size, query_mode, key_mask,
                num_levels):
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
  if (not isinstance(block_size, int) or isinstance(block_size, bool)
      or block_size < 2 or block_size & (block_size - 1)):
    raise ValueError(f"block_size must be a power of two >= 2, got {block_size!r}")
  if query_mode not in QUERY_MODES:
    raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
  if key_mask is not None and tuple(key_mask.shape) != tuple(query.shape[:2]):
    raise ValueError(f"key_mask must have shape {tuple(query.shape[:2])}, got "
                     f"{tuple(key_mask.shape)}")
  if num_levels is not None and (not isinstance(num_levels, int)
                                 or isinstance(num_levels, bool)
                                 or num_levels < 1):
    raise ValueError(f"num_levels must be an int >= 1 or None, got {num_levels!r}")


def _padded_length(length: int, block_size: int) -> int:
  """Smallest block_size * 2**M >= length with M >= 1."""
  padded = 2 * block_size
  while padded < length:
    padded *= 2
  return padded


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


def _cell_sums(x: jnp.ndarray, cell: int) -> jnp.ndarray:
  """Sums aligned cells along axis 2: [b, h, n, ...] -> [b, h, n // cell, ...]."""
  x = x.reshape(x.shape[:2] + (x.shape[2] // cell, cell) + x.shape[3:])
  return x.sum(3) if cell > 1 else x[:, :, :, 0]


def _pair_sum(x: jnp.ndarray) -> jnp.ndarray:
  """Sums adjacent pairs along axis 2: [b, h, n, ...] -> [b, h, n // 2, ...]."""
  return x[:, :, 0::2] + x[:, :, 1::2]


def _windows(blocks: jnp.ndarray, offsets) -> jnp.ndarray:
  """Key windows: [b, h, n + e, keys, ...] -> [b, h, n, len(offsets) * keys, ...].

  Window j concatenates blocks j + o for o in offsets (n + e blocks given,
  e = max(offsets)).
  """
  n = blocks.shape[2] - max(offsets)
  return jnp.concatenate([blocks[:, :, o:o + n] for o in offsets], axis=3)


def _attend(q, k, v, allowed, count, scale) -> _Stats:
  """Softmax pieces of blocks of query rows against one key window each.

  q: [batch, heads, blocks, rows, dim]; k, v: [batch, heads, blocks, keys,
  dim]; allowed: bool broadcastable to [batch, heads, blocks, rows, keys];
  count: None (each key is one position) or float32 broadcastable to the same,
  the number of real positions a coarse key stands for (k is then their mean
  and v the sum of their values).
  Returns _Stats with m, s: [batch, heads, blocks * rows], o: [..., dim].
  """
  logits = jnp.einsum("bhnqd,bhnkd->bhnqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(allowed, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.maximum(logits.max(-1), _NO_MAX))
  p = jnp.exp(logits - m[..., None])
  s = (p if count is None else p * count).sum(-1)
  o = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return _Stats(_unblock(m), _unblock(s), _unblock(o))


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


def _merge(fine: _Stats, coarse: _Stats) -> _Stats:
  """Softmax pieces over two disjoint key sets, row by row.

  fine: rows [batch, heads, n]; coarse: rows [batch, heads, n] or
  [batch, heads, n // 2], each row then shared by two rows of `fine`.
  """
  if coarse.m.shape[2] != fine.m.shape[2]:
    coarse = _Stats(*(_repeat2(x) for x in coarse))
  m = jnp.maximum(fine.m, coarse.m)
  wa, wb = jnp.exp(fine.m - m), jnp.exp(coarse.m - m)
  return _Stats(m, fine.s * wa + coarse.s * wb,
                fine.o * wa[..., None] + coarse.o * wb[..., None])


def _level0(q, k_ext, v_ext, real_ext, cfg: _Config) -> _Stats:
  """Exact attention of each query block to itself and its neighbour blocks.

  q: [batch, heads, chunk, dim]; k_ext, v_ext: [batch, heads, chunk + e * b,
  dim], the chunk's keys after the block before it (and before the block after
  it when bidirectional, e = 2; e = 1 when causal); real_ext: [batch, 1,
  chunk + e * b] bool. Returns _Stats over [batch, heads, chunk] rows.
  """
  b = cfg.block_size
  offsets = (0, 1) if cfg.causal else (0, 1, 2)
  window = lambda x: _windows(_blocks(x, b), offsets)
  allowed = window(real_ext)[:, :, :, None, :]  # [batch, 1, n, 1, keys]
  if cfg.causal:  # the previous block in full, the own block up to the row
    allowed = allowed & (jnp.arange(2 * b)[None] <= jnp.arange(b)[:, None] + b)
  return _attend(_blocks(q, b), window(k_ext), window(v_ext), allowed, None,
                 cfg.scale)


def _coarse_level(q, before, after, left_row, cfg: _Config) -> _Stats:
  """Attention of query blocks to their coarse neighbour blocks at a level >= 1.

  q: [batch, heads, n, rows, dim] query rows by block; before, after: each
  (kmean, vsum, count) of the coarse block before / after each query block:
  [batch, heads, n, b, dim] key means and value sums in q's dtype, [batch, 1,
  n, b] float32 counts (after is None when causal); left_row: bool [rows, 1],
  row in the left half of its block. Of the block before, a left-half row sees
  the left half only (the right half is adjacent one level finer), and
  symmetrically for the block after. Returns _Stats over [batch, heads, n *
  rows] rows.
  """
  left_key = (jnp.arange(cfg.block_size) < cfg.block_size // 2)[None]
  parts = [(before, ~left_row | left_key)]
  if after is not None:
    parts.append((after, left_row | ~left_key))
  k, v, count = (jnp.concatenate([p[0][i] for p in parts], axis=3)
                 for i in range(3))
  halves = jnp.concatenate([p[1] for p in parts], axis=-1)  # [rows, keys]
  count = count[:, :, :, None, :]
  return _attend(q, k, v, (count > 0) & halves, count, cfg.scale)


def _mean(ksum, count, dtype):
  """Cell means ksum / count (0 for empty cells), cast to dtype."""
  return (ksum / jnp.maximum(count, 1.0)[..., None]).astype(dtype)


def _chunk_output(c, q, k, v, realf, side, cfg: _Config):
  """Output rows of one chunk of queries (every level, merged and normalised).

  c: chunk index (traced or int); q, k, v: [batch, heads, chunk, dim];
  realf: [batch, 1, chunk] float32 (1 for real keys); side: this chunk's
  entries of `_side_inputs` (chunk axis dropped). Returns [batch, heads, chunk,
  dim] in q's dtype.
  """
  b, chunk, causal = cfg.block_size, cfg.chunk, cfg.causal
  count = realf  # [batch, 1, cells]
  weight = count[..., None]
  ksum = k.astype(jnp.float32) * weight
  vsum = v.astype(jnp.float32) * weight
  qsum = q.astype(jnp.float32) * weight if cfg.query_mode == "mean" else None
  local = []  # per level 1.. with cells inside the chunk: (ksum, vsum, count, qsum)
  for level in range(1, cfg.levels):
    if 2**level > chunk:
      break
    ksum, vsum, count = _pair_sum(ksum), _pair_sum(vsum), _pair_sum(count)
    qsum = None if qsum is None else _pair_sum(qsum)
    local.append((ksum, vsum, count, qsum))
  stats = None
  for level in reversed(range(1, cfg.levels)):
    level_stats = _chunk_level(c, level, q, local, side["levels"][level - 1], cfg)
    stats = level_stats if stats is None else _merge(level_stats, stats)
  s0 = side["level0"]
  ext = lambda x, i: jnp.concatenate(
      [s0[i], x] + ([] if causal else [s0[i + 3]]), axis=2)
  level_stats = _level0(q, ext(k, 0), ext(v, 1), ext(realf, 2) > 0, cfg)
  stats = level_stats if stats is None else _merge(level_stats, stats)
  out = stats.o / jnp.where(stats.s > 0, stats.s, 1.0)[..., None]
  return out.astype(q.dtype)


def _chunk_level(c, level, q, local, side, cfg: _Config) -> _Stats:
  """Stats of one chunk's query rows at coarse level `level` >= 1.

  q: [batch, heads, chunk, dim]; local: the chunk's cell sums per level (see
  `_chunk_output`); side: this level's entries of `_side_inputs`.
  """
  b, chunk, cell = cfg.block_size, cfg.chunk, 2**level
  width = b * cell  # positions per block
  rows = chunk if cfg.query_mode == "fine" else max(chunk // cell, 1)
  if cfg.query_mode == "fine":
    q_rows = q
  elif cell > chunk:  # the chunk lies in one cell: its query comes from outside
    q_rows = side["q"]
  elif cfg.query_mode == "sample":
    q_rows = q[:, :, ::cell]
  else:
    q_rows = _mean(local[level - 1][3], local[level - 1][2], q.dtype)
  kv = lambda s, i: (_mean(s[i], s[i + 2], q.dtype), s[i + 1].astype(q.dtype),
                     s[i + 2])
  if width <= chunk:  # whole blocks in the chunk, neighbours from the side inputs
    ksum, vsum, count, _ = local[level - 1]
    n = chunk // width
    own = (_blocks(_mean(ksum, count, q.dtype), b), _blocks(vsum, b).astype(q.dtype),
           _blocks(count, b))
    prev, nxt = kv(side["sums"], 0), (None if cfg.causal else kv(side["sums"], 3))
    ext = lambda i: jnp.concatenate([prev[i][:, :, None], own[i]] + (
        [] if nxt is None else [nxt[i][:, :, None]]), axis=2)
    exts = [ext(i) for i in range(3)]
    before = tuple(x[:, :, :n] for x in exts)
    after = None if nxt is None else tuple(x[:, :, 2:] for x in exts)
    per_block = rows // n
    left_row = (jnp.arange(per_block) < per_block // 2)[:, None]
  else:  # the chunk lies in one half of one query block
    n = 1
    before = tuple(x[:, :, None] for x in kv(side["sums"], 0))
    after = None if cfg.causal else tuple(x[:, :, None] for x in kv(side["sums"], 3))
    starts = np.arange(cfg.num_chunks) * chunk
    left = jnp.asarray(starts % width < width // 2)[c]
    left_row = jnp.broadcast_to(left, (rows, 1))
  return _coarse_level(_blocks(q_rows, rows // n), before, after, left_row, cfg)




def _side_inputs(q, k, v, realf, cfg: _Config) -> dict:
  """Per chunk, what its queries need from outside the chunk.

  q, k, v: [batch, heads, padded, dim]; realf: [batch, 1, padded] float32.
  Returns {"level0": [k, v, real of the block before the chunk, then (when
  bidirectional) of the block after], "levels": per level l >= 1 {"sums":
  [ksum, vsum, count of the coarse block before, then (bidirectional) after],
  "q": the chunk's query row when a cell is longer than the chunk, else None}},
  every array with the chunk axis at position 2: raw [batch, heads|1,
  chunks, b(, dim)], sums float32 [batch, heads|1, chunks, b(, dim)], q
  [batch, heads, chunks, 1, dim]. For coarse blocks inside the chunk's
  neighbour chunks these are the last (first) block of the previous (next)
  chunk; for longer blocks, the blocks before (after) the one holding the chunk.
  """
  b, chunk, n = cfg.block_size, cfg.chunk, cfg.num_chunks
  by_chunk = lambda x: x.reshape(x.shape[:2] + (n, chunk) + x.shape[3:])

  def edges(x, width, cell):
    """Cell sums of the last (first) width positions of the previous (next) chunk."""
    sums = lambda y: y.reshape(y.shape[:3] + (width // cell, cell) + y.shape[4:]).sum(4)
    return (_shift(sums(by_chunk(x)[:, :, :, chunk - width:]), -1),
            _shift(sums(by_chunk(x)[:, :, :, :width]), 1))

  level0 = [edges(x, b, 1) for x in (k, v, realf)]
  weight = realf[..., None]
  sums = (k.astype(jnp.float32) * weight, v.astype(jnp.float32) * weight, realf)
  qsum = q.astype(jnp.float32) * weight if cfg.query_mode == "mean" else None
  starts = np.arange(n) * chunk
  levels, cells = [], None
  for level in range(1, cfg.levels):
    cell = 2**level
    width = b * cell
    entry = {"q": None}
    if width <= chunk:
      pairs = [edges(x, width, cell) for x in sums]
    else:
      if cells is None:  # cell sums of the first level with blocks longer than a chunk
        cells = [_cell_sums(x, cell) for x in sums + ((qsum,) if qsum is not None else ())]
      else:
        cells = [_pair_sum(x) for x in cells]
      block = starts // width  # query block holding each chunk
      pairs = []
      for x in cells[:3]:
        x = _blocks(x, b)  # [batch, heads, blocks, b, ...]
        padded = jnp.pad(x, [(0, 0), (0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 3))
        pairs.append((padded[:, :, block], padded[:, :, block + 2]))
      if cell > chunk and cfg.query_mode == "sample":
        entry["q"] = q[:, :, (starts >> level) << level][:, :, :, None]
      elif cell > chunk and cfg.query_mode == "mean":
        entry["q"] = _mean(cells[3], cells[2], q.dtype)[:, :, starts >> level][:, :, :, None]
    order = [0, 1, 2] if cfg.causal else [0, 1, 2, 3, 4, 5]
    flat = [p[0] for p in pairs] + [p[1] for p in pairs]
    entry["sums"] = [flat[i] for i in order]
    levels.append(entry)
  flat0 = [p[0] for p in level0] + [p[1] for p in level0]
  return {"level0": flat0[:3] if cfg.causal else flat0, "levels": levels}


def _chunk_args(c, q, k, v, realf, side, cfg: _Config):
  """The arguments of `_chunk_output` for chunk c (traced) of full arrays."""
  rows = lambda x: jax.lax.dynamic_slice_in_dim(x, c * cfg.chunk, cfg.chunk, axis=2)
  pick = lambda x: jax.lax.dynamic_index_in_dim(x, c, axis=2, keepdims=False)
  return (rows(q), rows(k), rows(v), rows(realf), jax.tree.map(pick, side))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg: _Config, q, k, v, realf, side):
  """`_chunk_output` of every chunk: [batch, heads, padded, dim] in q's dtype.

  Runs chunk by chunk in a loop; the backward pass recomputes each chunk's
  forward (nothing but the inputs is kept), so temporaries stay chunk-sized.
  """
  def step(c, out):
    out_c = _chunk_output(c, *_chunk_args(c, q, k, v, realf, side, cfg), cfg)
    return jax.lax.dynamic_update_slice_in_dim(out, out_c, c * cfg.chunk, axis=2)
  return jax.lax.fori_loop(0, cfg.num_chunks, step, jnp.zeros(q.shape, q.dtype))


def _chunked_fwd(cfg, q, k, v, realf, side):
  return _chunked(cfg, q, k, v, realf, side), (q, k, v, realf, side)


def _chunked_bwd(cfg, residuals, d_out):
  """Per chunk: recompute, pull d_out back, write the chunk's gradients."""
  q, k, v, realf, side = residuals

  def step(c, grads):
    args = _chunk_args(c, q, k, v, realf, side, cfg)
    d_out_c = jax.lax.dynamic_slice_in_dim(d_out, c * cfg.chunk, cfg.chunk, axis=2)
    _, pull = jax.vjp(lambda *a: _chunk_output(c, *a, cfg), *args)
    d_args = pull(d_out_c)
    rows = [jax.lax.dynamic_update_slice_in_dim(g, d, c * cfg.chunk, axis=2)
            for g, d in zip(grads[:4], d_args[:4])]
    put = lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d, c, axis=2)
    return (*rows, jax.tree.map(put, grads[4], d_args[4]))

  zeros = jax.tree.map(jnp.zeros_like, residuals)
  return jax.lax.fori_loop(0, cfg.num_chunks, step, zeros)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def hierarchical_attention(query, key, value, *, block_size: int = 16,
                           causal: bool = True, query_mode: str = "sample",
                           key_mask=None, num_levels: int | None = None):
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
    num_levels: if set, only levels < num_levels are used (1 = block-local
      attention over the diagonal and neighbour blocks).

  Returns:
    [batch, length, heads, head_dim] in query's dtype. Rows that see no key
    return zeros.
  """
  _check_args(query, key, value, block_size, query_mode, key_mask, num_levels)
  if causal and query_mode == "mean":
    warnings.warn("hierarchical_attention: causal=True with query_mode='mean' "
                  "leaks future queries within a cell (leakage ablation only)",
                  stacklevel=2)
  batch, length, _, dim = query.shape
  padded = _padded_length(length, block_size)
  levels = int(math.log2(padded // block_size))
  if num_levels is not None:
    levels = min(levels, num_levels)
  scale = 1.0 / math.sqrt(dim)

  heads = query.shape[2]
  # One head: the batch stands in for the heads axis ([1, batch, ...]), a pure
  # reshape that keeps XLA from copying the inputs into the chunk loop.
  fold = heads == 1

  def prepare(x):  # [batch, length, heads, dim] -> [batch, heads, padded, dim]
    x = x.reshape(1, batch, length, dim) if fold else x.transpose(0, 2, 1, 3)
    return jnp.pad(x, [(0, 0), (0, 0), (0, padded - length), (0, 0)])

  q, k, v = prepare(query), prepare(key), prepare(value)
  if key_mask is None:
    key_mask = jnp.ones((batch, length), bool)
  realf = jnp.pad(key_mask.astype(jnp.float32), [(0, 0), (0, padded - length)])
  realf = realf[None] if fold else realf[:, None]  # [batch, 1, padded] or [1, batch, padded]
  chunk = min(padded, max(CHUNK, 2 * block_size))
  cfg = _Config(block_size, chunk, padded // chunk, levels, causal, query_mode, scale)
  side = _side_inputs(q, k, v, realf, cfg)
  if cfg.num_chunks == 1:
    pick = lambda x: x[:, :, 0]
    out = _chunk_output(0, q, k, v, realf, jax.tree.map(pick, side), cfg)
  else:
    out = _chunked(cfg, q, k, v, realf, side)
  out = out[:, :, :length]
  if fold:
    return out.reshape(batch, length, 1, dim)
  return out.transpose(0, 2, 1, 3)

