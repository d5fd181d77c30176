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

The parts, from the bottom up (math and scheduling apart):

* `hattention.cells`: positions and cells (key sums, counts, segment-id ranges) and how
  they coarsen, pairwise or by aligned groups.
* `hattention.level`: one level's math, `level0` and `coarse_level`, for blocks of query
  rows against the key blocks they see, named by role (own block, `Flanks`); one einsum
  per level.
* `hattention.softmax`: the per-level softmax pieces (`Stats`) and their merge.
* `hattention.schedule`: what one chunk of `chunk_size` query positions computes, and
  what it gets from outside itself per level (`Side`).
* `hattention.chunk_loop`: the loop over chunks, under a custom VJP whose backward pass
  recomputes each chunk, so temporaries stay chunk-sized (forward-mode differentiation
  then needs a single chunk, i.e. padded length <= chunk_size).
* this module: argument checks, layout and padding, and the public function.

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

import jax.numpy as jnp

from hattention import relative_position
from hattention.cells import Positions
from hattention.chunk_loop import run_chunks
from hattention.geometry import QUERY_MODES, check_power_of_two, level_count, padded_length
from hattention.schedule import Config, chunk_output, side_inputs


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
  check_power_of_two("block_size", block_size)
  check_power_of_two("chunk_size", chunk_size)
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
  cfg = Config(block_size, chunk, padded // chunk, levels, causal, query_mode,
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
  x = Positions(prepare(query), prepare(key), prepare(value),
                per_position(real.astype(jnp.float32)), segment)
  out = run_chunks(functools.partial(chunk_output, cfg=cfg), cfg.num_chunks, x,
                   side_inputs(x, cfg), table)
  out = out[:, :, :length]
  if fold:
    return out.reshape(batch, length, 1, dim)
  return out.transpose(0, 2, 1, 3)
