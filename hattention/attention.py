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

Every neighbour block is its own batched einsum against a shifted copy of the
keys (no concatenated windows). Coarse key/value sums and counts are built
level by level by pairwise sums (O(L) in all); a cell's logit uses the mean key,
its weight in the softmax is its count and its value is the sum of its values.
"sample" and "mean" queries are one per cell, so level l costs O(L / 2**l) and
the levels merge from coarse to fine, broadcasting the running softmax
statistics over the two halves of each cell: O(L) time and memory. "fine" keeps
every query at every level: O(L log L).

Levels merge with a per-row running max / log-sum-exp in float32; the maxima
are stop-gradient stabilisers (the output does not depend on them).
"""

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

QUERY_MODES = ("sample", "fine", "mean")
_NO_MAX = -1e30  # row max of a row that sees nothing (finite: no inf - inf)


class _Stats(NamedTuple):
  """Unnormalised softmax pieces of a set of rows, all float32.

  m: [..., rows] row max (stop-gradient); s: [..., rows] sum of weights
  exp(logit - m); o: [..., rows, head_dim] weighted sum of values.
  """
  m: jnp.ndarray
  s: jnp.ndarray
  o: jnp.ndarray


class _Window(NamedTuple):
  """One block of keys seen by each block of query rows.

  k, v: [batch, heads, blocks, keys, head_dim]; allowed: bool broadcastable to
  [batch, heads, blocks, rows, keys]; count: None (each key is one position)
  or float32 broadcastable to the same, the number of real positions a coarse
  key stands for (k is then their mean and v the sum of their values).
  """
  k: jnp.ndarray
  v: jnp.ndarray
  allowed: jnp.ndarray
  count: jnp.ndarray | None = None


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
  """Block i of the result is block i + offset of x (zeros outside); axis 2."""
  pad = [(0, 0)] * x.ndim
  if offset < 0:
    pad[2] = (-offset, 0)
    return jnp.pad(x, pad)[:, :, :x.shape[2]]
  pad[2] = (0, offset)
  return jnp.pad(x, pad)[:, :, offset:]


def _pair_sum(x: jnp.ndarray) -> jnp.ndarray:
  """Sums adjacent pairs along axis 2: [b, h, n, ...] -> [b, h, n // 2, ...]."""
  return x[:, :, 0::2] + x[:, :, 1::2]


def _attend(q, windows, scale) -> _Stats:
  """Softmax pieces of blocks of query rows against their key windows.

  q: [batch, heads, blocks, rows, dim]; windows: list of _Window.
  Returns _Stats with m, s: [batch, heads, blocks * rows], o: [..., dim].
  """
  logits = [jnp.where(w.allowed, jnp.einsum(
      "bhnqd,bhnkd->bhnqk", q, w.k, preferred_element_type=jnp.float32) * scale,
                      -jnp.inf) for w in windows]
  m = jax.lax.stop_gradient(
      jnp.max(jnp.stack([x.max(-1) for x in logits]), axis=0))
  m = jnp.maximum(m, _NO_MAX)
  s = o = 0.0
  for w, x in zip(windows, logits):
    p = jnp.exp(x - m[..., None])
    s = s + (p if w.count is None else p * w.count).sum(-1)
    o = o + jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(w.v.dtype), w.v,
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


def _level0(q, k, v, real, block_size, causal, scale) -> _Stats:
  """Exact attention of each block to itself and its neighbour blocks.

  q, k, v: [batch, heads, padded, dim]; real: [batch, padded] bool.
  Returns _Stats over [batch, heads, padded] rows.
  """
  b = block_size
  qb, kb, vb = (_blocks(x, b) for x in (q, k, v))
  realb = _blocks(real[:, None], b)[:, :, :, None, :]  # [batch, 1, n, 1, b]
  diag = realb
  if causal:
    pos = jnp.arange(b)
    diag = diag & (pos[:, None] >= pos[None])
  windows = [_Window(kb, vb, diag)]
  for offset in (-1,) if causal else (-1, 1):
    windows.append(_Window(_shift(kb, offset), _shift(vb, offset),
                           _shift(realb, offset)))
  return _attend(qb, windows, scale)


def _coarse_level(q, ksum, vsum, count, block_size, causal, scale) -> _Stats:
  """Attention of query blocks to the coarse neighbour blocks at one level l >= 1.

  q: [batch, heads, rows, dim], rows = cells (sample/mean) or positions (fine);
  ksum, vsum: [batch, heads, cells, dim] float32 key/value sums over each
  cell's real positions; count: [batch, 1, cells] their number (float32).
  Returns _Stats over [batch, heads, rows] rows.
  """
  b = block_size
  nblocks = ksum.shape[2] // b
  rows = q.shape[2] // nblocks  # query rows per block
  kmean = _blocks((ksum / jnp.maximum(count, 1.0)[..., None]).astype(q.dtype), b)
  vsum = _blocks(vsum.astype(q.dtype), b)
  cb = _blocks(count, b)[:, :, :, None, :]  # [batch, 1, n, 1, b]
  left_row = (jnp.arange(rows) < rows // 2)[:, None]  # [rows, 1]
  left_key = (jnp.arange(b) < b // 2)[None, :]  # [1, b]
  # Block i - 1: the left-half rows see only its left half; block i + 1: the
  # right-half rows see only its right half.
  parts = [(-1, ~left_row | left_key)]
  if not causal:
    parts.append((1, left_row | ~left_key))
  windows = []
  for offset, halves in parts:
    c = _shift(cb, offset)
    windows.append(_Window(_shift(kmean, offset), _shift(vsum, offset),
                           (c > 0) & halves, c))
  return _attend(_blocks(q, rows), windows, scale)


def _coarse_inputs(q, k, v, real, levels, query_mode):
  """Per coarse level l = 1 .. levels - 1: (query rows, ksum, vsum, count).

  q, k, v: [batch, heads, padded, dim]; real: [batch, padded] bool. Sums are
  float32 over the real positions of each cell of 2**l positions; query rows
  are one per cell ("sample", "mean") or one per position ("fine").
  """
  count = real[:, None].astype(jnp.float32)  # [batch, 1, cells]
  weight = count[..., None]
  ksum, vsum = k.astype(jnp.float32) * weight, v.astype(jnp.float32) * weight
  qsum = q.astype(jnp.float32) * weight if query_mode == "mean" else None
  per_level = []
  for level in range(1, levels):
    ksum, vsum, count = _pair_sum(ksum), _pair_sum(vsum), _pair_sum(count)
    if query_mode == "sample":
      q_level = q[:, :, ::2**level]
    elif query_mode == "mean":
      qsum = _pair_sum(qsum)
      q_level = (qsum / jnp.maximum(count, 1.0)[..., None]).astype(q.dtype)
    else:
      q_level = q
    per_level.append((q_level, ksum, vsum, count))
  return per_level


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

  def prepare(x):  # [batch, length, heads, dim] -> [batch, heads, padded, dim]
    return jnp.pad(x.transpose(0, 2, 1, 3),
                   [(0, 0), (0, 0), (0, padded - length), (0, 0)])

  q, k, v = prepare(query), prepare(key), prepare(value)
  if key_mask is None:
    key_mask = jnp.ones((batch, length), bool)
  real = jnp.pad(key_mask.astype(bool), [(0, 0), (0, padded - length)])

  stats = None
  for q_l, ksum, vsum, count in reversed(
      _coarse_inputs(q, k, v, real, levels, query_mode)):
    level_stats = _coarse_level(q_l, ksum, vsum, count, block_size, causal,
                                scale)
    stats = level_stats if stats is None else _merge(level_stats, stats)
  level_stats = _level0(q, k, v, real, block_size, causal, scale)
  stats = level_stats if stats is None else _merge(level_stats, stats)

  out = stats.o / jnp.where(stats.s > 0, stats.s, 1.0)[..., None]
  return out[:, :, :length].transpose(0, 2, 1, 3).astype(query.dtype)
