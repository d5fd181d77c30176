"""Softmax over masked logits: in one piece, or in pieces merged row by row.

`masked_softmax` is the plain softmax of the dense paths (the decoding step, the dense
reference). The fast attention computes a row's softmax over several disjoint key sets (one
per level) and merges them: `Stats` holds the unnormalised pieces of a set, `merge` combines
two of them with a running max, `normalise` divides at the end.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

NO_MAX = -1e30  # row max of a row that sees nothing (finite: no inf - inf)
# Row max given to dropped rows in `merge`: below any row max, so that their weight
# exp(DROPPED - m) is 0 even beside a row that sees nothing (a select on the weight
# instead made the segment forward 7% slower at 4k).
DROPPED = 2 * NO_MAX


def masked_softmax(logits, mask):
  """float32 softmax of `logits` over the last axis, over the entries where `mask` holds.

  mask: bool broadcastable to logits. A row with no entry allowed gets all zeros.
  """
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = weights.sum(-1, keepdims=True)
  return weights / jnp.where(denom > 0, denom, 1.0)


class Stats(NamedTuple):
  """Unnormalised softmax pieces of a set of rows, all float32.

  m: [..., rows] row max (stop-gradient); s: [..., rows] sum of weights
  exp(logit - m); o: [..., rows, head_dim] weighted sum of values.
  """
  m: jnp.ndarray
  s: jnp.ndarray
  o: jnp.ndarray


def _repeat2(x: jnp.ndarray) -> jnp.ndarray:
  """Repeats each row twice along axis 2: [b, h, n, ...] -> [b, h, 2n, ...].

  For XLA's CPU backend: written as two interleaving pads, whose transpose is a pairwise
  sum of strided slices (the transpose of a broadcast is a reduction over an axis of size
  2, which that backend runs very slowly).
  """
  def interleave(low, high):
    config = [(0, 0, 0)] * x.ndim
    config[2] = (low, high, 1)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  return interleave(0, 1) + interleave(1, 0)


def merge(fine: Stats, coarse: Stats | None, keep=None) -> Stats:
  """Softmax pieces over two disjoint key sets, row by row.

  fine: rows [batch, heads, n]; coarse: rows [batch, heads, n] or
  [batch, heads, n // 2], each row then shared by two rows of `fine`; keep:
  None or bool [batch, 1, n], the rows of `fine` that take `coarse` (the others
  give it the row max DROPPED, hence the weight 0).
  """
  if coarse is None:
    return fine
  if coarse.m.shape[2] != fine.m.shape[2]:
    coarse = Stats(m=_repeat2(coarse.m), s=_repeat2(coarse.s), o=_repeat2(coarse.o))
  coarse_m = coarse.m if keep is None else jnp.where(keep, coarse.m, DROPPED)
  m = jnp.maximum(fine.m, coarse_m)
  wa, wb = jnp.exp(fine.m - m), jnp.exp(coarse_m - m)
  return Stats(m, fine.s * wa + coarse.s * wb,
               fine.o * wa[..., None] + coarse.o * wb[..., None])


def normalise(stats: Stats) -> jnp.ndarray:
  """float32 [..., rows, head_dim]: the softmax-weighted values (rows that saw nothing: 0)."""
  return stats.o / jnp.where(stats.s > 0, stats.s, 1.0)[..., None]
