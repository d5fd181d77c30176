"""T5's bucketed relative position bias for causal full attention (the paper's baseline).

A query at row t and a key at row s <= t are n = t - s apart. The distance falls in one of
`num_buckets` buckets: the first half hold n = 0 .. num_buckets / 2 - 1 one each, the second
half cover num_buckets / 2 <= n < max_distance in logarithmically wider ranges, and every
n >= max_distance falls in the last bucket (T5's causal setting: 32 buckets, distance 128). A
learned table [num_buckets, H] (H heads, or 1: one column for every head) gives each bucket
a logit bias; T5 shares one table by every layer.

Within a packed segment, row differences equal position differences, and pairs of different
segments are masked, so a sentence reads the same entries in a packed row as alone.
"""

import math

import jax.numpy as jnp

NUM_BUCKETS = 32
MAX_DISTANCE = 128


def bucket(distance, num_buckets: int = NUM_BUCKETS, max_distance: int = MAX_DISTANCE):
  """int32 bucket of each causal distance t - s (int array; negative distances: bucket 0)."""
  n = jnp.maximum(jnp.asarray(distance, jnp.int32), 0)
  exact = num_buckets // 2
  log_fraction = jnp.log(jnp.maximum(n, exact).astype(jnp.float32) / exact) / math.log(
      max_distance / exact)  # 0 at n = exact, 1 at n = max_distance
  far = exact + (log_fraction * (num_buckets - exact)).astype(jnp.int32)
  return jnp.where(n < exact, n, jnp.minimum(far, num_buckets - 1))


def bias(table, query_rows, key_rows, max_distance: int = MAX_DISTANCE):
  """float32 [..., H, queries, keys]: the table's entry for every query row and key row.

  table: [num_buckets, H]; query_rows: int [..., queries]; key_rows: int [keys].
  """
  buckets = bucket(query_rows[..., :, None] - key_rows, table.shape[0], max_distance)
  return jnp.moveaxis(jnp.take(table.astype(jnp.float32), buckets, axis=0), -1, -3)
