"""Tests for hattention/geometry.py: padding, and where a packed segment gets its own outputs."""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hattention import (hierarchical_attention, init_cache, level_count, packing_slot,
                        padded_length)
from hattention.reference import level_map


def test_padded_length():
  assert [padded_length(n, 4) for n in (1, 8, 9, 16, 17, 33)] == [8, 8, 16, 16, 32, 64]
  assert padded_length(1024, 16) == 1024 and padded_length(1025, 16) == 2048


@pytest.mark.parametrize("bad", [12, 1, 0, -4, 16.0, True])
def test_every_caller_rejects_a_block_size_that_is_not_a_power_of_two(bad):
  """One check (geometry.check_power_of_two) behind the padding, the level count, the fast
  attention and the decoding cache, with the same message naming the value."""
  message = f"block_size must be a power of two >= 2, got {bad!r}"
  x = jnp.zeros((1, 8, 1, 4))
  for call in (lambda: padded_length(8, bad), lambda: level_count(8, bad),
               lambda: hierarchical_attention(x, x, x, block_size=bad),
               lambda: init_cache(1, 8, 1, 4, block_size=bad)):
    with pytest.raises(ValueError, match=re.escape(message)):
      call()


def test_packing_slot_by_hand():
  # n <= b + 1: anywhere; n <= 2b: inside two consecutive blocks; longer: aligned halves.
  assert packing_slot(17, 16)[1:] == (1, 16, 17)
  assert packing_slot(30, 16)[1:] == (1, 16, 30)
  assert [o for o in range(40) if packing_slot(30, 16).fits_at(o)] == [0, 1, 2, 16, 17, 18, 32,
                                                                       33, 34]
  assert packing_slot(100, 2)[1:] == (32, 64, 128)  # cells of 32: footprint [o, o + 128)
  assert packing_slot(33, 16)[1:] == (16, 32, 34)
  assert packing_slot(48, 16).fits_at(16) and not packing_slot(49, 16).fits_at(16)
  assert packing_slot(49, 16).first_offset(1) == 32 and packing_slot(48, 16).first_offset(1) == 16
  with pytest.raises(ValueError, match="block_size must be a power of two >= 2, got 12"):
    packing_slot(5, 12)
  with pytest.raises(ValueError, match="length must be a positive int, got 0"):
    packing_slot(0, 16)


@pytest.mark.parametrize("block_size", [2, 4])
def test_packing_slot_keeps_every_pair_level_and_cell(block_size):
  """The proof's geometry, checked exhaustively: at every offset the slot allows, each pair of
  the segment has the level it has alone, and the cells of up to half its padded length that
  it uses start on the segment's own grid; `first_offset` finds the first such offset."""
  row = 160
  row_levels = level_map(padded_length(row, block_size), block_size)
  for n in range(1, 4 * block_size + 3):
    slot = packing_slot(n, block_size)
    alone = level_map(padded_length(n, block_size), block_size)[:n, :n]
    largest_cell = padded_length(n, block_size) // 2 // block_size
    fits = [o for o in range(row - n) if slot.fits_at(o)]
    assert fits and all(slot.first_offset(p) == min(o for o in fits if o >= p)
                        for p in range(fits[-1] + 1))
    for o in range(row - n):
      same = (row_levels[o:o + n, o:o + n] == alone).all() and o % largest_cell == 0
      if slot.fits_at(o):
        assert same, (n, o)
      if n <= 2 * block_size:  # one level: the slot allows every such offset
        assert slot.fits_at(o) == same, (n, o)
    assert slot.span >= n and slot.span % largest_cell == 0


def _first_fit(lengths, block_size, row, seed):
  """segment_ids [row] and (offset, length) per placed segment: each segment at the first
  offset packing_slot allows after the previous footprint and a random gap of 0-3 positions
  (skipped when it does not fit)."""
  rng = np.random.default_rng(seed)
  segment_ids, placed, cursor = np.zeros(row, np.int32), [], 0
  for n in map(int, lengths):
    slot = packing_slot(n, block_size)
    offset = slot.first_offset(cursor + int(rng.integers(0, 4)))
    if offset + n > row:
      continue
    segment_ids[offset:offset + n] = len(placed) + 1
    placed.append((offset, n))
    cursor = offset + slot.span
  return segment_ids, placed


def _with_segments_alone(qkv, segment_ids, placed):
  """The packed row followed by one row per segment: the segment alone at offset 0, its
  padding after it (segment 0). Inputs [1 + segments, row, ...], segment ids [1 + segments,
  row]; one call runs both (a single compile)."""
  rows, ids = [x[0] for x in qkv], [segment_ids]
  alone_rows = [[], [], []]
  for offset, n in placed:
    for i, x in enumerate(rows):
      alone_rows[i].append(jnp.roll(x, -offset, axis=0))
    ids.append(np.where(np.arange(len(segment_ids)) < n, 1, 0))
  stacked = tuple(jnp.stack([x] + a) for x, a in zip(rows, alone_rows))
  return stacked, jnp.asarray(np.stack(ids))


def _largest_difference_to_alone(qkv, segment_ids, placed, **options):
  """max |output of a packed segment - the same segment alone|; checks padding rows are 0."""
  stacked, ids = _with_segments_alone(qkv, segment_ids, placed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # causal "mean"
    out = jax.jit(hierarchical_attention, static_argnames=_STATIC)(
        *stacked, segment_ids=ids, **options)
  assert float(jnp.abs(out[0, segment_ids == 0]).max(initial=0.0)) == 0.0
  return max(float(jnp.abs(out[0, offset:offset + n] - out[1 + i, :n]).max())
             for i, (offset, n) in enumerate(placed))


_STATIC = ("block_size", "causal", "query_mode", "chunk_size")


def _inputs(length, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (1, length, 2, 8)) for k in keys)


# Each query mode causal and bidirectional, block sizes 2, 4, 16, rows whose length is not a
# power of two, random segment lengths and gaps; one layout runs chunk by chunk.
PACKED = [  # (query_mode, causal, block_size, row, longest segment, chunk_size)
    ("sample", True, 2, 200, 70, 512),
    ("mean", False, 2, 200, 70, 512),
    ("fine", True, 4, 300, 100, 32),
    ("sample", False, 4, 300, 100, 32),
    ("mean", True, 16, 500, 150, 512),
    ("fine", False, 16, 500, 150, 512),
]


@pytest.mark.parametrize("query_mode,causal,block_size,row,longest,chunk_size", PACKED)
def test_segment_packed_with_packing_slot_gets_its_outputs_alone(query_mode, causal, block_size,
                                                                 row, longest, chunk_size):
  rng = np.random.default_rng(row)
  short = rng.integers(1, 2 * block_size + 2, 20)  # one level: unaligned offsets
  lengths = np.where(rng.random(20) < 0.4, short, rng.integers(1, longest, 20))
  segment_ids, placed = _first_fit(lengths, block_size, row, seed=row)
  assert len(placed) >= 4 and any(o % block_size for o, _ in placed)  # some unaligned
  assert _largest_difference_to_alone(
      _inputs(row, seed=row), segment_ids, placed, block_size=block_size, causal=causal,
      query_mode=query_mode, chunk_size=chunk_size) < 1e-5


def test_segment_alone_with_a_padding_tail_is_the_segment_alone():
  """What the test above compares with: a segment at offset 0 followed by padding gives the
  outputs of hierarchical_attention on the segment's positions only."""
  q, k, v = _inputs(48, seed=4)
  segment_ids = jnp.asarray(np.arange(48) < 37, jnp.int32)[None]
  attention = jax.jit(functools.partial(hierarchical_attention, block_size=2, causal=False))
  tail = attention(q, k, v, segment_ids=segment_ids)
  alone = attention(q[:, :37], k[:, :37], v[:, :37])
  np.testing.assert_allclose(tail[:, :37], alone, atol=1e-5)


def test_segment_in_another_footprint_breaks_the_equality():
  """b = 2: a 100-token segment at 0 uses cells of 32 positions up to 128; a 3-token
  segment at 102 sits in the level-5 cell [96, 128), which becomes mixed."""
  segment_ids = np.zeros(128, np.int32)
  segment_ids[:100], segment_ids[102:105] = 1, 2
  assert packing_slot(100, 2).span > 102  # the layout violates the footprint
  difference = _largest_difference_to_alone(
      _inputs(128, seed=3), segment_ids, [(0, 100), (102, 3)], block_size=2, causal=False,
      query_mode="sample", chunk_size=512)
  assert difference > 1e-2
