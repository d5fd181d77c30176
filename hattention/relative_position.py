"""The hierarchical relative position bias: which entry of the table a pair of cells reads.

H-Transformer-1D's official code gives its attention a learned bias per head over the relative
positions of a query cell and a key cell in the same or a neighbouring block of b cells, one
table shared by every level. At level l the cells are 2**l positions wide (single positions at
level 0); a pair (t, s) seen at level l reads entry

  (s >> l) - (t >> l) + 2 * b - 1,

in [0, 4 b - 2] because the two blocks are neighbours (`relative_index`), and the entry is added
to the pair's logit after the 1/sqrt(head_dim) scaling. The entry depends only on cell indices,
so a packed segment placed where `hattention.packing_slot` allows (offsets that are multiples of
its largest cell) reads the same entries as alone.

A table is [4 b - 1, H] (shared by the levels) or [levels, 4 b - 1, H] (one per level; level l
reads row min(l, levels - 1)), with H the number of heads or 1 (one column for every head).
"""

import jax.numpy as jnp


def table_size(block_size: int) -> int:
  """Number of relative cell positions a level's table holds: 4 * block_size - 1."""
  return 4 * block_size - 1


def canonical_table(table, block_size: int, heads: int):
  """float32 [levels, 4 b - 1, H] of a relative_bias argument (None stays None).

  Raises ValueError naming the expected shapes when `table` has none of them.
  """
  if table is None:
    return None
  size = table_size(block_size)
  shape = tuple(table.shape)
  levels = (1,) if len(shape) == 2 else shape[:-2]
  if (len(levels) != 1 or levels[0] < 1 or shape[-2:] not in ((size, 1), (size, heads))
      or not jnp.issubdtype(table.dtype, jnp.floating)):
    raise ValueError(f"relative_bias must be a float [{size}, heads] or [levels, {size}, heads] "
                     f"table (heads = {heads} or 1; 4 * block_size - 1 = {size}), got shape "
                     f"{shape} dtype {table.dtype}")
  return table.reshape(levels + shape[-2:]).astype(jnp.float32)


def level_table(table, level: int):
  """[4 b - 1, H] the table of `level` (a static int) from a canonical table."""
  return table[min(level, table.shape[0] - 1)]


def relative_index(query_cell, key_cell, block_size: int):
  """int32 table entries of query cells against key cells, broadcast together.

  Cells count from any common origin at the pair's level. Pairs outside neighbouring blocks
  (never seen by the rule) are clipped into the table.
  """
  index = jnp.asarray(key_cell) - jnp.asarray(query_cell) + 2 * block_size - 1
  return jnp.clip(index, 0, table_size(block_size) - 1).astype(jnp.int32)


def logit_bias(table_l, index):
  """float32 [H, *index.shape]: the entries `index` of a level's table [4 b - 1, H]."""
  return jnp.moveaxis(jnp.take(table_l, index, axis=0), -1, 0)
