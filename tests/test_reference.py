"""Tests that hattention/reference.py implements the pair rule of issue 2.

The reference is checked against a brute-force loop over (t, s) pairs written
straight from the rule (level of the pair, cell means over real keys, one
softmax term per fine key, causal mask), in float64 numpy, for tiny lengths.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hattention import padded_length
from hattention.reference import hierarchical_attention_reference, level_map


def _pair_level(t: int, s: int, block_size: int) -> int:
  """min { l : |t // (b 2**l) - s // (b 2**l)| <= 1 }, by counting up."""
  level = 0
  while abs(t // (block_size << level) - s // (block_size << level)) > 1:
    level += 1
  return level


def _cell_mean(x: np.ndarray, real: np.ndarray, position: int,
               level: int) -> np.ndarray:
  """Mean of x[i] over the real i of the aligned cell of 2**level holding position.

  x: [padded, dim]; real: [padded] bool. Zeros when the cell has no real i.
  """
  start = (position >> level) << level
  rows = [x[i] for i in range(start, start + 2**level) if real[i]]
  return np.mean(rows, axis=0) if rows else np.zeros(x.shape[1])


def _cell(position: int, level: int) -> range:
  """The positions of the aligned cell of 2**level holding position."""
  start = (position >> level) << level
  return range(start, start + 2**level)


def _segment_rule(t, s, level, segment, real, query_mode) -> bool:
  """The segment conditions of pair (t, s) at `level` (segment: [padded], 0 = padding)."""
  if not real[s] or segment[s] != segment[t]:
    return False
  if level == 0:
    return True
  if any(real[u] and segment[u] != segment[t] for u in _cell(s, level)):
    return False
  if query_mode == "sample":
    return segment[_cell(t, level)[0]] == segment[t]
  if query_mode == "mean":
    return all(segment[u] == segment[t] for u in _cell(t, level) if segment[u] > 0)
  return True


def _brute_force(query, key, value, block_size, causal, query_mode,
                 key_mask=None, num_levels=None, segment_ids=None):
  """The rule, one (batch, head, t, s) at a time. Inputs [B, L, H, D]."""
  query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
  batch, length, heads, dim = query.shape
  padded = padded_length(length, block_size)
  pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
  q, k, v = (np.pad(x, pad) for x in (query, key, value))
  mask = np.ones((batch, length), bool) if key_mask is None else np.asarray(key_mask)
  segment = None
  if segment_ids is not None:
    segment = np.pad(np.maximum(np.asarray(segment_ids), 0), [(0, 0), (0, padded - length)])
    mask = mask & (np.asarray(segment_ids) > 0)
  real = np.pad(mask, [(0, 0), (0, padded - length)])
  out = np.zeros((batch, length, heads, dim))
  for b, h, t in itertools.product(range(batch), range(heads), range(length)):
    logits, values = [], []
    for s in range(padded):
      level = _pair_level(t, s, block_size)
      if not real[b, s] or (causal and s > t):
        continue
      if num_levels is not None and level >= num_levels:
        continue
      if segment is not None and not _segment_rule(t, s, level, segment[b], real[b],
                                                   query_mode):
        continue
      if query_mode == "fine" or level == 0:
        q_t = q[b, t, h]
      elif query_mode == "sample":
        q_t = q[b, (t >> level) << level, h]
      else:  # mean
        q_t = _cell_mean(q[b, :, h], real[b], t, level)
      k_s = _cell_mean(k[b, :, h], real[b], s, level)
      logits.append(q_t @ k_s / np.sqrt(dim))
      values.append(v[b, s, h])
    if logits:
      weights = np.exp(np.array(logits) - max(logits))
      out[b, t, h] = weights @ np.array(values) / weights.sum()
  return out


def _inputs(length, batch=2, heads=2, dim=4, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, dim)) for k in keys)


def _end_padding_mask(length, batch=2):
  """[batch, length] bool: row 0 full, row 1 with its last third masked."""
  lengths = np.array([length, max(1, length - length // 3 - 1)])[:batch]
  return np.arange(length)[None] < lengths[:, None]


def test_level_map_by_hand():
  # block 2, padded 16 (M = 3): blocks of 2, 4, 8 positions.
  want = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(level_map(16, 2)[:1], want)
  row_7 = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
  np.testing.assert_array_equal(level_map(16, 2)[7], row_7)


@pytest.mark.parametrize("padded,block_size", [(8, 2), (16, 2), (32, 4), (64, 4)])
def test_level_map_matches_rule(padded, block_size):
  levels = level_map(padded, block_size)
  want = [[_pair_level(t, s, block_size) for s in range(padded)]
          for t in range(padded)]
  np.testing.assert_array_equal(levels, want)
  assert levels.max() == int(np.log2(padded // block_size)) - 1


CASES = [  # (length, block_size, causal, query_mode, masked, num_levels)
    (5, 2, True, "sample", False, None),
    (5, 2, False, "mean", True, None),
    (9, 2, True, "fine", True, None),
    (9, 2, False, "sample", True, None),
    (9, 2, True, "mean", False, None),
    (16, 2, False, "fine", False, None),
    (13, 4, True, "sample", True, None),
    (19, 2, True, "fine", False, 2),
    (19, 2, False, "mean", True, 1),
]


@pytest.mark.parametrize("length,block_size,causal,query_mode,masked,num_levels", CASES)
def test_reference_matches_brute_force(length, block_size, causal, query_mode,
                                       masked, num_levels):
  q, k, v = _inputs(length, seed=length)
  mask = _end_padding_mask(length) if masked else None
  got = hierarchical_attention_reference(
      q, k, v, block_size=block_size, causal=causal, query_mode=query_mode,
      key_mask=mask, num_levels=num_levels)
  want = _brute_force(q, k, v, block_size, causal, query_mode, mask, num_levels)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_query_modes_and_levels_matter():
  """The brute force distinguishes what it should (else the checks above are weak)."""
  q, k, v = _inputs(16, seed=1)
  outs = {mode: _brute_force(q, k, v, 2, False, mode)
          for mode in ("sample", "fine", "mean")}
  for a, b in itertools.combinations(outs.values(), 2):
    assert np.abs(a - b).max() > 1e-3
  capped = _brute_force(q, k, v, 2, False, "fine", num_levels=2)
  assert np.abs(capped - outs["fine"]).max() > 1e-3


def test_cell_weighs_by_number_of_real_keys():
  """A coarse cell with n real keys counts n times: masking one of four equal keys
  of a coarse cell changes the output, which a one-term-per-cell softmax would not."""
  length, block_size = 16, 2
  q, k, v = (np.array(x) for x in _inputs(length, batch=1, heads=1, seed=2))
  k[0, 12:16] = k[0, 15]  # the level-2 cell seen by t = 0: same key and value
  v[0, 12:16] = v[0, 15]
  mask = np.ones((1, length), bool)
  mask[0, 14] = False
  full = hierarchical_attention_reference(q, k, v, block_size=block_size,
                                          causal=False, query_mode="fine")
  masked = hierarchical_attention_reference(q, k, v, block_size=block_size,
                                            causal=False, query_mode="fine",
                                            key_mask=mask)
  want = _brute_force(q, k, v, block_size, False, "fine", mask)
  np.testing.assert_allclose(masked, want, atol=1e-5)
  assert np.abs(np.asarray(masked - full))[0, 0].max() > 1e-4


@pytest.mark.parametrize("length,block_size,causal", [(4, 2, True), (7, 4, False),
                                                      (32, 16, True)])
def test_short_sequences_equal_full_attention(length, block_size, causal):
  q, k, v = _inputs(length, seed=3)
  for mode in ("sample", "fine", "mean"):
    got = hierarchical_attention_reference(q, k, v, block_size=block_size,
                                           causal=causal, query_mode=mode)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_are_zero():
  q, k, v = _inputs(6, batch=1, seed=4)
  mask = jnp.array([[False, False, True, True, True, True]])
  out = hierarchical_attention_reference(q, k, v, block_size=2, causal=True,
                                         key_mask=mask)
  assert np.all(np.asarray(out[0, :2]) == 0)
  assert np.all(np.abs(np.asarray(out[0, 2:])).sum(-1) > 0)


# Segments back to back with gaps, split in several runs, with and without key_mask.
SEGMENTS = {
    "back_to_back": [[1, 1, 1, 2, 2, 0, 3, 3, 3, 3, 3, 3, 4, 0, 5, 5, 5, 0, 0],
                     [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0]],
    "split": [[1, 2, 1, 1, 2, 2, 0, 3, 1, 3, 3, 3, 2, 0, 1, 1, 3, 3, 2],
              [2, 2, 1, 1, 1, 0, 1, 1, 2, 1, 1, 2, 2, 2, 2, 1, 1, 0, 1]],
}
SEGMENT_CASES = [  # (block_size, causal, query_mode, layout, masked)
    (2, True, "sample", "back_to_back", False),
    (2, False, "mean", "split", True),
    (2, False, "fine", "back_to_back", True),
    (4, True, "fine", "split", False),
    (2, False, "sample", "split", False),
    (4, False, "mean", "back_to_back", False),
]


@pytest.mark.parametrize("block_size,causal,query_mode,layout,masked", SEGMENT_CASES)
def test_reference_segments_match_brute_force(block_size, causal, query_mode, layout, masked):
  q, k, v = _inputs(19, seed=5)
  mask = _end_padding_mask(19) if masked else None
  segment_ids = np.array(SEGMENTS[layout])
  options = dict(block_size=block_size, causal=causal, query_mode=query_mode, key_mask=mask)
  got = hierarchical_attention_reference(q, k, v, segment_ids=segment_ids, **options)
  want = _brute_force(q, k, v, block_size, causal, query_mode, mask, segment_ids=segment_ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  plain = _brute_force(q, k, v, block_size, causal, query_mode, mask)
  assert np.abs(want - plain).max() > 1e-2  # the segments matter

