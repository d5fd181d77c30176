"""Dense O(length^2) hierarchical attention, built directly from the pair rule.

For tests only. It materialises a [padded_length, padded_length] level map and a
logit matrix per level, so it is slow and memory hungry by design; its only job is
to be obviously correct.

The rule (block size b, padded length T' = b * 2**M, the smallest with M >= 1):

  level(t, s) = min { l : |t // (b * 2**l) - s // (b * 2**l)| <= 1 }

At level l the key of position s is the mean of the real keys in the aligned cell
of 2**l positions holding s; the query of position t depends on ``query_mode``
("fine": query[t]; "sample": query[(t >> l) << l]; "mean": mean of the real
queries of t's cell). The softmax runs over every real fine position s (and only
s <= t when causal), each weighted by exp(q_l(t) . k_l(s) / sqrt(head_dim)) and
carrying value[s]. Rows that see no key at all return zeros.

Segments (``segment_ids``; 0 or negative = padding): a real key is a position
with key_mask and a nonzero segment; a non-padding position is one with a
nonzero segment. The pair (t, s) at level l = level(t, s) counts only if s is
a real key of t's segment and, for l >= 1:
  - every real key of s's level-l cell is in t's segment;
  - "sample": the first position of t's level-l cell is in t's segment;
    "mean": every non-padding position of t's level-l cell is; "fine": no
    condition.
The cell means stay over the real keys (and real queries) of the cell.

Relative bias (``relative_bias``, `hattention.relative_position`): the pair (t, s) at level l
adds relative_bias[l or the table's last level, (s >> l) - (t >> l) + 2 b - 1, head] to its
scaled logit.
"""

import math

import jax.numpy as jnp
import numpy as np

from hattention import relative_position
from hattention.geometry import padded_length
from hattention.softmax import masked_softmax


def level_map(padded: int, block_size: int) -> np.ndarray:
  """[padded, padded] int array: the level at which query t sees key s."""
  positions = np.arange(padded)
  levels = np.full((padded, padded), -1, dtype=np.int32)
  level, width = 0, block_size
  while (levels < 0).any():
    t_block = positions[:, None] // width
    s_block = positions[None, :] // width
    near = np.abs(t_block - s_block) <= 1
    levels = np.where((levels < 0) & near, level, levels)
    level, width = level + 1, width * 2
  return levels


def _cell_mean(x: jnp.ndarray, real: jnp.ndarray, cell: int) -> jnp.ndarray:
  """Mean of x over real positions of each aligned cell, broadcast back to positions.

  x: [batch, padded, heads, dim]; real: [batch, padded] bool.
  """
  batch, padded, heads, dim = x.shape
  weights = real.astype(x.dtype)[:, :, None, None]
  sums = (x * weights).reshape(batch, padded // cell, cell, heads, dim).sum(2)
  counts = weights.reshape(batch, padded // cell, cell, 1, 1).sum(2)
  means = sums / jnp.maximum(counts, 1.0)
  return jnp.repeat(means, cell, axis=1)


def _level_query(query, real, level, query_mode):
  """[batch, padded, heads, dim] query each position uses at `level`."""
  cell = 2**level
  if query_mode == "fine" or level == 0:
    return query
  if query_mode == "sample":
    starts = (np.arange(query.shape[1]) >> level) << level
    return query[:, starts]
  if query_mode == "mean":
    return _cell_mean(query, real, cell)
  raise ValueError(f"query_mode={query_mode!r}")


def _cell_of(padded: int, level: int) -> np.ndarray:
  """[padded, padded] bool: position u lies in the level-`level` cell of position p."""
  cells = np.arange(padded) >> level
  return cells[:, None] == cells[None, :]


def _segment_conditions(segment, real, level, query_mode):
  """[batch, t, s] bool: the level-`level` conditions of the segment rule.

  segment: [batch, padded] int (0 = padding); real: [batch, padded] bool.
  """
  padded = segment.shape[1]
  in_cell = _cell_of(padded, level)  # [p, u]
  # foreign[b, t, u]: position u holds something of another segment than t's
  foreign = segment[:, None, :] != segment[:, :, None]
  # every real key u of s's cell is in t's segment: no u in cell(s) with real & foreign
  bad_key = (foreign & real[:, None, :]).astype(jnp.float32) @ in_cell.T.astype(np.float32)
  keys_ok = bad_key == 0  # [b, t, s]
  if query_mode == "fine":
    return keys_ok
  if query_mode == "sample":
    first = (np.arange(padded) >> level) << level
    query_ok = segment[:, first] == segment  # [b, t]
  else:  # "mean": every non-padding position u of t's cell is in t's segment
    bad = foreign & (segment > 0)[:, None, :] & in_cell[None]
    query_ok = ~bad.any(-1)
  return keys_ok & query_ok[:, :, None]


def hierarchical_attention_reference(query, key, value, *, block_size=16,
                                     causal=True, query_mode="sample",
                                     key_mask=None, segment_ids=None,
                                     num_levels=None, relative_bias=None):
  """Dense reference of hierarchical attention.

  Args:
    query, key, value: [batch, length, heads, head_dim].
    block_size: the paper's Nr, a power of two >= 2.
    causal: only keys at s <= t are seen.
    query_mode: "sample", "fine" or "mean".
    key_mask: optional [batch, length] bool, True for real tokens.
    segment_ids: optional [batch, length] int, the segment of each position
      (0 or negative: padding), with the rule in the module docstring.
    num_levels: if set, pairs whose level is >= num_levels are dropped
      (num_levels=1 is block-local attention over the diagonal and neighbour
      blocks).
    relative_bias: optional [4 b - 1, H] or [levels, 4 b - 1, H] table (H = heads or 1), the
      rule of the module docstring.

  Returns:
    [batch, length, heads, head_dim] in query's dtype, computed in float32.
  """
  batch, length, heads, dim = query.shape
  padded = padded_length(length, block_size)
  pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(x.astype(jnp.float32), pad) for x in (query, key, value))
  if key_mask is None:
    key_mask = jnp.ones((batch, length), dtype=bool)
  real = jnp.pad(key_mask.astype(bool), [(0, 0), (0, padded - length)])
  segment = None
  if segment_ids is not None:
    segment = jnp.pad(jnp.maximum(jnp.asarray(segment_ids), 0), [(0, 0), (0, padded - length)])
    real = real & (segment > 0)

  levels = level_map(padded, block_size)
  allowed = real[:, None, None, :]  # [batch, 1, 1, s]
  if causal:
    allowed = allowed & np.tril(np.ones((padded, padded), dtype=bool))
  if num_levels is not None:
    allowed = allowed & (levels < num_levels)
  if segment is not None:
    same = segment[:, :, None] == segment[:, None, :]  # [batch, t, s]
    for level in range(1, int(levels.max()) + 1):
      same = same & ((levels != level) | _segment_conditions(segment, real, level, query_mode))
    allowed = allowed & same[:, None]

  table = relative_position.canonical_table(relative_bias, block_size, heads)
  positions = np.arange(padded)
  logits = jnp.zeros((batch, heads, padded, padded), jnp.float32)
  for level in range(int(levels.max()) + 1):
    q_l = _level_query(q, real, level, query_mode)
    k_l = _cell_mean(k, real, 2**level)
    logits_l = jnp.einsum("bthd,bshd->bhts", q_l, k_l) / math.sqrt(dim)
    if table is not None:
      index = relative_position.relative_index((positions >> level)[:, None],
                                               (positions >> level)[None], block_size)
      logits_l = logits_l + relative_position.logit_bias(
          relative_position.level_table(table, level), index)
    logits = jnp.where(levels == level, logits_l, logits)

  out = jnp.einsum("bhts,bshd->bthd", masked_softmax(logits, allowed), v)
  return out[:, :length].astype(query.dtype)
