"""Tests for the hierarchical relative position bias (hattention/relative_position.py) in
hierarchical_attention, its dense reference and decode_step."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hattention import decode_step, hierarchical_attention, init_cache, packing_slot
from hattention.reference import hierarchical_attention_reference
from hattention.relative_position import relative_index, table_size

_STATIC = ("block_size", "causal", "query_mode", "num_levels", "chunk_size")


def _inputs(length, heads=2, batch=2, dim=8, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, dim)) for k in keys)


def _table(shape, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _segments(length):
  """[2, length]: row 0 three back-to-back segments and a padding tail, row 1 one segment."""
  row = np.zeros(length, np.int32)
  third = length // 3
  row[:third], row[third:2 * third], row[2 * third:length - 3] = 1, 2, 3
  return jnp.asarray(np.stack([row, np.ones(length, np.int32)]))


def _values_and_grads(fn, q, k, v, table, options):
  """fn's output and the gradients of <output, cotangent> w.r.t. query and table (jitted)."""
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)

  def run(q, table):
    out, pull = jax.vjp(lambda q, t: fn(q, k, v, relative_bias=t, **options), q, table)
    return out, pull(cotangent)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # causal "mean" leakage warning
    return jax.jit(run)(q, table)


# Every query mode causal and bidirectional, shared / per-level / one-column tables, key_mask,
# segments, one chunk and the chunked path (chunk 8: cells longer than a chunk at 100).
CASES = [  # (length, block_size, heads, causal, query_mode, table shape, chunk_size, masks)
    (100, 4, 2, True, "sample", (15, 2), 512, None),
    (100, 4, 2, False, "fine", (3, 15, 2), 512, "key_mask"),
    (70, 2, 3, True, "mean", (7, 1), 512, "segments"),
    (100, 4, 2, True, "sample", (2, 15, 2), 8, "segments"),
    (100, 4, 1, True, "fine", (15, 1), 8, "key_mask"),
    (100, 2, 2, False, "mean", (9, 7, 2), 8, None),
    (100, 4, 2, False, "sample", (15, 2), 16, "segments"),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_relative_bias_matches_reference_values_and_gradients(case):
  length, block_size, heads, causal, query_mode, shape, chunk_size, masks = case
  q, k, v = _inputs(length, heads, seed=length)
  table = _table(shape)
  options = dict(block_size=block_size, causal=causal, query_mode=query_mode)
  if masks == "key_mask":
    options["key_mask"] = jnp.arange(length)[None] < jnp.array([length, length - 31])[:, None]
  if masks == "segments":
    options["segment_ids"] = _segments(length)
  got, (got_dq, got_dtable) = _values_and_grads(
      hierarchical_attention, q, k, v, table, dict(options, chunk_size=chunk_size))
  want, (want_dq, want_dtable) = _values_and_grads(
      hierarchical_attention_reference, q, k, v, table, options)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_dq, want_dq, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got_dtable, want_dtable, atol=1e-4, rtol=1e-4)
  assert got_dtable.shape == table.shape and float(jnp.abs(got_dtable).max()) > 1e-3


def test_table_changes_the_output_and_a_zero_table_changes_nothing():
  q, k, v = _inputs(64, seed=3)
  fn = jax.jit(hierarchical_attention, static_argnames=_STATIC)
  plain = fn(q, k, v, block_size=4)
  zero = fn(q, k, v, block_size=4, relative_bias=jnp.zeros((15, 2)))
  biased = fn(q, k, v, block_size=4, relative_bias=_table((15, 2)))
  np.testing.assert_allclose(zero, plain, atol=1e-6, rtol=0)
  assert float(jnp.abs(biased - plain).max()) > 0.1


def test_relative_index_by_hand():
  # block 2: cells of the block before the query's block are 0, 1; the query's 2, 3; after 4, 5.
  query_cell = np.array([2, 3])[:, None]
  key_cell = np.arange(6)[None]
  np.testing.assert_array_equal(relative_index(query_cell, key_cell, 2),
                                [[1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5]])
  assert table_size(2) == 7 and table_size(16) == 63


def test_entry_reaches_exactly_the_pairs_at_its_cell_distance():
  """One large entry (cell distance -2) moves query t's weight onto the pairs whose cells at
  their level differ by two. Block 2, length 8, query 5: at level 0 it sees keys 2..5 (distance
  -3..0), at level 1 (cells of 2) the cell of keys 0, 1 (cell 0 against its cell 2). Distance -2
  picks key 3 and that cell, which weighs as its 2 keys: weights 1/3 on keys 0, 1, 3."""
  q, k, _ = _inputs(8, heads=1, batch=1, seed=4)
  q, k = jnp.zeros_like(q), jnp.zeros_like(k)  # equal logits: the bias alone decides
  v = jnp.eye(8)[None, :, None, :]  # value of position s = one-hot s
  table = jnp.zeros((7, 1)).at[3 - 2, 0].set(30.0)  # entry of cell distance -2
  fn = jax.jit(hierarchical_attention, static_argnames=_STATIC)
  weights = fn(q, k, v, block_size=2, query_mode="fine", relative_bias=table)[0, 5, 0]
  np.testing.assert_allclose(weights, [1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0, 0], atol=1e-6)
  want = hierarchical_attention_reference(q, k, v, block_size=2, query_mode="fine",
                                          relative_bias=table)[0, 5, 0]
  np.testing.assert_allclose(weights, want, atol=1e-6)


@pytest.mark.parametrize("query_mode,shape,num_levels", [
    ("sample", (15, 2), None), ("fine", (2, 15, 1), None), ("sample", (9, 15, 2), 3)])
def test_decode_with_relative_bias_matches_forward(query_mode, shape, num_levels):
  length = 70
  q, k, v = _inputs(length, seed=5)
  table = _table(shape, seed=6)
  options = dict(block_size=4, query_mode=query_mode, num_levels=num_levels)
  want = jax.jit(hierarchical_attention, static_argnames=_STATIC)(
      q, k, v, relative_bias=table, **options)

  def decode_all(q, k, v, table):
    def step(cache, qkv):
      out, cache = decode_step(cache, *(x[:, None] for x in qkv), relative_bias=table)
      return cache, out[:, 0]
    cache = init_cache(2, length, 2, 8, **options)
    _, outs = jax.lax.scan(step, cache, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v)))
    return jnp.swapaxes(outs, 0, 1)
  got = jax.jit(decode_all)(q, k, v, table)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  plain = jax.jit(decode_all)(q, k, v, jnp.zeros_like(table))
  assert float(jnp.abs(plain - got).max()) > 0.1


@pytest.mark.parametrize("query_mode", ["sample", "fine"])
def test_packed_segment_gets_its_outputs_alone_with_a_table(query_mode):
  """A segment at a `packing_slot` offset among others reads the same table entries."""
  block_size, n = 4, 37
  table = _table((3, 15, 2), seed=8)
  q, k, v = _inputs(n, batch=1, seed=9)
  fn = jax.jit(hierarchical_attention, static_argnames=_STATIC)
  alone = fn(q, k, v, block_size=block_size, query_mode=query_mode, relative_bias=table)
  slot = packing_slot(n, block_size)
  offset = slot.first_offset(23)
  length = offset + slot.span + 5
  row = lambda x, noise: jnp.concatenate([noise[:, :offset], x, noise[:, offset + n:]], axis=1)
  others = _inputs(length, batch=1, seed=10)
  packed = [row(x, y) for x, y in zip((q, k, v), others)]
  segment_ids = jnp.where(jnp.arange(length) < offset, 1,
                          jnp.where(jnp.arange(length) < offset + n, 2, 3))[None]
  out = fn(*packed, block_size=block_size, query_mode=query_mode, relative_bias=table,
           segment_ids=segment_ids)
  np.testing.assert_allclose(out[:, offset:offset + n], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16, 2), (15, 3), (2, 3, 15, 2), (0, 15, 2)])
def test_bad_table_shape_raises(shape):
  q, k, v = _inputs(16, seed=11)
  pattern = re.escape(f"got shape {shape}")
  with pytest.raises(ValueError, match=f"relative_bias must be .*{pattern}"):
    hierarchical_attention(q, k, v, block_size=4, relative_bias=jnp.zeros(shape))
  cache = init_cache(2, 16, 2, 8, block_size=4)
  with pytest.raises(ValueError, match="relative_bias must be"):
    decode_step(cache, q[:, :1], k[:, :1], v[:, :1], relative_bias=jnp.zeros(shape))
