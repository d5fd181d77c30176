"""Tests for hattention/attention.py, the fast O(L) / O(L log L) path."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from hattention import hierarchical_attention, packing_slot
from hattention.reference import hierarchical_attention_reference

_STATIC = ("block_size", "causal", "query_mode", "num_levels")
# Jitted once per configuration: far cheaper on CPU than op-by-op dispatch.
_fast = jax.jit(hierarchical_attention, static_argnames=_STATIC)
_reference = jax.jit(hierarchical_attention_reference, static_argnames=_STATIC)


def _inputs(length, batch=2, heads=2, dim=8, seed=0, dtype=jnp.float32):
  """query, key, value: [batch, length, heads, dim] standard normal."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, dim), dtype)
               for k in keys)


def _end_padding_mask(length, batch=2):
  """[batch, length] bool: row 0 full, later rows padded at the end."""
  lengths = [length] + [max(1, length - length // 3 - 1)] * (batch - 1)
  return jnp.arange(length)[None] < jnp.array(lengths)[:, None]


def _quiet(fn, *args, **kwargs):
  """Calls fn with the causal "mean" leakage warning silenced."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    return fn(*args, **kwargs)


# Every length, block size, mode, causal flag and mask option appears, each mode
# both causal and bidirectional, without the full cartesian product.
CASES = [  # (length, block_size, heads, causal, query_mode, masked)
    (1, 2, 1, True, "sample", False),
    (7, 4, 3, False, "fine", True),
    (100, 16, 2, True, "mean", True),
    (100, 2, 2, True, "sample", True),
    (257, 2, 2, False, "sample", False),
    (257, 4, 2, False, "mean", False),
    (1024, 16, 1, True, "fine", False),
    (1024, 4, 2, False, "sample", True),
]


def _case(index):
  """Inputs and options of CASES[index] (reused by other tests: no recompiles)."""
  length, block_size, heads, causal, query_mode, masked = CASES[index]
  qkv = _inputs(length, heads=heads, seed=length + block_size)
  options = dict(block_size=block_size, causal=causal, query_mode=query_mode,
                 key_mask=_end_padding_mask(length) if masked else None)
  return qkv, options


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c) for c in CASES])
def test_matches_reference(index):
  (q, k, v), options = _case(index)
  got = _quiet(_fast, q, k, v, **options)
  want = _quiet(_reference, q, k, v, **options)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,block_size,causal,masked,query_mode", [
    (3, 2, True, False, "sample"), (8, 4, False, True, "fine"),
    (20, 16, True, True, "mean"), (32, 16, False, False, "sample")])
def test_short_sequences_equal_full_attention(length, block_size, causal, masked,
                                              query_mode):
  q, k, v = _inputs(length, seed=length)
  key_mask = _end_padding_mask(length) if masked else None
  dense_mask = None if key_mask is None else key_mask[:, None, None, :]
  want = jax.nn.dot_product_attention(q, k, v, mask=dense_mask, is_causal=causal)
  got = _quiet(_fast, q, k, v, block_size=block_size, causal=causal,
               query_mode=query_mode, key_mask=key_mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _perturb_after(x, t, seed):
  """x with positions > t replaced by fresh noise."""
  noise = jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
  return jnp.where(jnp.arange(x.shape[1])[None, :, None, None] > t, noise, x)


@pytest.mark.parametrize("query_mode", ["sample", "fine"])
def test_causal_modes_do_not_see_the_future(query_mode):
  q, k, v = _inputs(100, seed=5)
  base = _fast(q, k, v, block_size=4, query_mode=query_mode)
  for t in (0, 37, 64, 98):
    moved = _fast(*(_perturb_after(x, t, seed=t + i) for i, x in enumerate((q, k, v))),
                  block_size=4, query_mode=query_mode)
    np.testing.assert_allclose(moved[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
    assert np.abs(np.asarray(moved[:, t + 1:] - base[:, t + 1:])).max() > 1e-2


def test_causal_mean_leaks_and_warns():
  (q, k, v), options = _case(2)  # causal "mean", length 100, block 16
  base = _quiet(_fast, q, k, v, **options)
  t = 50  # its level-1 cell {50, 51} has a later query
  moved_q = _perturb_after(q, t, seed=7)  # only later queries change
  moved = _quiet(_fast, moved_q, k, v, **options)
  assert np.abs(np.asarray(moved[:, :t + 1] - base[:, :t + 1])).max() > 1e-3
  small = _inputs(4, batch=1, heads=1, dim=2)
  with pytest.warns(UserWarning, match="leak"):
    hierarchical_attention(*small, block_size=2, query_mode="mean")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    hierarchical_attention(*small, block_size=2, query_mode="mean", causal=False)
    hierarchical_attention(*small, block_size=2, query_mode="sample")


def test_check_grads():
  q, k, v = _inputs(12, batch=1, heads=1, dim=4, seed=8)
  mask = _end_padding_mask(12, batch=1)
  fn = jax.jit(lambda q, k, v: hierarchical_attention(
      q, k, v, block_size=2, query_mode="sample", key_mask=mask))
  check_grads(fn, (q, k, v), order=1, modes=("fwd", "rev"), atol=2e-2,
              rtol=2e-2, eps=1e-2)


def test_gradients_match_reference():
  q, k, v = _inputs(40, seed=9)
  mask = _end_padding_mask(40)
  cotangent = jax.random.normal(jax.random.PRNGKey(10), q.shape)
  options = dict(block_size=4, causal=True, query_mode="fine", key_mask=mask)
  loss = lambda attention: jax.jit(jax.grad(
      lambda q, k, v: (attention(q, k, v, **options) * cotangent).sum(),
      argnums=(0, 1, 2)))
  got = loss(hierarchical_attention)(q, k, v)
  want = loss(hierarchical_attention_reference)(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


BF16_ATOL = 3e-2  # outputs are averages of O(1) values; bf16 has 8 mantissa bits


def test_bfloat16_close_to_float32():
  (q, k, v), options = _case(3)
  f32 = _fast(q, k, v, **options)
  bf16 = _fast(*(x.astype(jnp.bfloat16) for x in (q, k, v)), **options)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(jnp.float32), f32, atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("index", [3, 5, 6])
def test_logits_scaled_by_100_stay_finite(index):
  (q, k, v), options = _case(index)
  q, k = q * 10.0, k * 10.0  # logits x 100
  got = np.asarray(_quiet(_fast, q, k, v, **options))
  assert np.isfinite(got).all()
  assert (np.abs(got).sum(-1) > 1e-3).all()  # no zeroed rows
  want = _quiet(_reference, q, k, v, **options)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_jit_and_vmap():
  (q, k, v), options = _case(1)
  jitted = _fast(q, k, v, **options)
  # vmap over an extra leading axis: one batch row per mapped element.
  split = tuple(x[:, None] for x in (q, k, v))
  mask = options.pop("key_mask")[:, None]
  mapped = jax.jit(jax.vmap(lambda q, k, v, m: hierarchical_attention(
      q, k, v, key_mask=m, **options)))(*split, mask)
  np.testing.assert_allclose(mapped[:, 0], jitted, atol=1e-6)
  eager = hierarchical_attention(*(x[:1, :3] for x in (q, k, v)), **options)
  np.testing.assert_allclose(eager, _fast(*(x[:1, :3] for x in (q, k, v)), **options),
                             atol=1e-6)


def _block_local_attention(q, k, v, block_size, causal):
  """Dense attention restricted to |t // b - s // b| <= 1 (and s <= t)."""
  blocks = jnp.arange(q.shape[1]) // block_size
  mask = jnp.abs(blocks[:, None] - blocks[None, :]) <= 1
  return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], is_causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_one_level_is_block_local_attention(causal):
  q, k, v = _inputs(100, seed=14)
  got = _fast(q, k, v, block_size=4, causal=causal, num_levels=1)
  np.testing.assert_allclose(got, _block_local_attention(q, k, v, 4, causal),
                             atol=1e-5, rtol=1e-5)


def test_num_levels_caps_the_hierarchy():
  (q, k, v), options = _case(2)  # length 100, block 16: pads to 128 = 16 * 2**3
  capped = _quiet(_fast, q, k, v, num_levels=2, **options)
  np.testing.assert_allclose(capped, _quiet(_reference, q, k, v, num_levels=2, **options),
                             atol=1e-5, rtol=1e-5)
  # Three levels: a cap of 3 or more changes nothing, a cap of 2 does.
  full = _quiet(_fast, q, k, v, **options)
  np.testing.assert_array_equal(_quiet(_fast, q, k, v, num_levels=3, **options), full)
  assert np.abs(np.asarray(capped - full)).max() > 1e-3


def test_rows_without_keys_are_zero():
  q, k, v = _inputs(6, batch=1, seed=16)
  mask = jnp.array([[False, False, True, True, True, True]])
  out = np.asarray(_fast(q, k, v, block_size=2, key_mask=mask))
  assert (out[0, :2] == 0).all() and (np.abs(out[0, 2:]).sum(-1) > 0).all()


_GOOD = jnp.zeros((2, 8, 2, 4))


@pytest.mark.parametrize("args,kwargs,pattern", [
    ((jnp.zeros((2, 8, 4)), _GOOD, _GOOD), {}, "query.*(2, 8, 4)"),
    ((_GOOD, jnp.zeros((2, 8, 2)), _GOOD), {}, "key.*(2, 8, 2)"),
    ((_GOOD, _GOOD, jnp.zeros((2, 8, 2, 4, 1))), {}, "value.*(2, 8, 2, 4, 1)"),
    ((_GOOD, jnp.zeros((2, 9, 2, 4)), _GOOD), {}, "key=(2, 9, 2, 4)"),
    ((_GOOD, _GOOD, jnp.zeros((2, 8, 2, 5))), {}, "value=(2, 8, 2, 5)"),
    ((_GOOD,) * 3, dict(block_size=3), "block_size.*3"),
    ((_GOOD,) * 3, dict(block_size=1), "block_size.*1"),
    ((_GOOD,) * 3, dict(block_size=16.0), "block_size.*16.0"),
    ((_GOOD,) * 3, dict(query_mode="coarse"), "query_mode.*'coarse'"),
    ((_GOOD,) * 3, dict(key_mask=jnp.ones((2, 7), bool)), "key_mask.*(2, 7)"),
    ((_GOOD,) * 3, dict(key_mask=jnp.ones((2, 8, 1), bool)), "key_mask.*(2, 8, 1)"),
    ((_GOOD,) * 3, dict(num_levels=0), "num_levels.*0"),
    ((_GOOD,) * 3, dict(num_levels=1.5), "num_levels.*1.5"),
    ((_GOOD,) * 3, dict(segment_ids=jnp.ones((2, 7), jnp.int32)), "segment_ids.*(2, 7)"),
    ((_GOOD,) * 3, dict(segment_ids=jnp.ones((2, 8))), "segment_ids must be integers"),
    ((_GOOD,) * 3, dict(chunk_size=48), "chunk_size.*48"),
    ((_GOOD,) * 3, dict(chunk_size=True), "chunk_size.*True"),
])
def test_bad_arguments_raise(args, kwargs, pattern):
  with pytest.raises(ValueError, match=re.escape(pattern).replace(r"\.\*", ".*")):
    hierarchical_attention(*args, **kwargs)


@pytest.mark.parametrize("query_mode,causal,masked,layout", [
    ("sample", True, True, None), ("fine", True, False, None),
    ("sample", True, False, "back_to_back"), ("mean", False, True, "aligned")])
def test_chunked_path_values_and_gradients_match_reference(query_mode, causal, masked, layout):
  """Sequences longer than chunk_size run chunk by chunk with a recomputing custom VJP."""
  q, k, v = _inputs(200, seed=11)
  mask = _end_padding_mask(200) if masked else None
  segment_ids = None if layout is None else _segments(200, layout, seed=12)
  options = dict(block_size=4, causal=causal, query_mode=query_mode, key_mask=mask,
                 segment_ids=segment_ids)
  fast_options = dict(options, chunk_size=16)  # 200 -> padded 256: 16 chunks, cells > chunk
  cotangent = jax.random.normal(jax.random.PRNGKey(12), q.shape)

  def output_and_grads(fn, **extra):
    def run(q, k, v):
      out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, **options, **extra), q, k, v)
      return out, pull(cotangent)
    return jax.jit(run)(q, k, v)

  jaxpr = str(jax.make_jaxpr(lambda q, k, v: hierarchical_attention(q, k, v, **fast_options))(
      q, k, v))
  assert "custom_vjp_call" in jaxpr  # the chunked path (fori_loop under a custom VJP) runs
  got_out, got = output_and_grads(hierarchical_attention, chunk_size=16)
  want_out, want = output_and_grads(hierarchical_attention_reference)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
  bf16 = jax.jit(lambda q, k, v: hierarchical_attention(q, k, v, **fast_options))(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)))
  np.testing.assert_allclose(bf16.astype(jnp.float32), want_out, atol=BF16_ATOL, rtol=0)


# ---------------------------------------------------------------------------- segments


def _segments(length, layout, seed=0):
  """[2, length] int32 segment ids (0 = padding) of a named layout.

  "one": row 0 one segment, row 1 one segment and a padding tail; "back_to_back": segments
  of 1-40 positions at arbitrary offsets, gaps of 0-3 padding positions; "aligned": the
  segments of "back_to_back" moved to the offsets `packing_slot` allows; "split": ids drawn
  again for 20% of the positions, so that segments are split in several runs.
  """
  rng = np.random.default_rng(seed)
  rows = np.zeros((2, length), np.int32)
  for row in rows:
    cursor, segment = 0, 1
    while cursor < length:
      n = int(rng.integers(1, 41))
      offset = cursor + int(rng.integers(0, 4))
      if layout == "aligned":
        offset = packing_slot(n, 2).first_offset(offset)  # block 2: aligned for every block
      row[offset:offset + n] = segment
      cursor, segment = offset + n, segment + 1
  if layout == "one":
    rows[0], rows[1] = 1, np.arange(length) < length - length // 3
  if layout == "split":
    rows = np.where(rng.random(rows.shape) < 0.2, rng.integers(0, 4, rows.shape), rows)
  return jnp.asarray(rows)


SEGMENT_CASES = [  # (length, block_size, causal, query_mode, layout, masked)
    (37, 2, True, "sample", "back_to_back", False),
    (37, 2, False, "mean", "split", True),
    (100, 4, True, "fine", "split", False),
    (100, 4, False, "sample", "aligned", True),
    (130, 16, True, "mean", "back_to_back", False),
    (70, 16, False, "fine", "one", True),
]


@pytest.mark.parametrize("length,block_size,causal,query_mode,layout,masked", SEGMENT_CASES,
                         ids=[str(c) for c in SEGMENT_CASES])
def test_segments_match_reference(length, block_size, causal, query_mode, layout, masked):
  q, k, v = _inputs(length, seed=length + block_size)
  options = dict(block_size=block_size, causal=causal, query_mode=query_mode,
                 key_mask=_end_padding_mask(length) if masked else None,
                 segment_ids=_segments(length, layout, seed=length))
  got = _quiet(_fast, q, k, v, **options)
  want = _quiet(_reference, q, k, v, **options)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _perturb_segment(x, segment_ids, segment, seed):
  """x [batch, length, ...] with the positions of `segment` replaced by fresh noise."""
  noise = jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
  return jnp.where((segment_ids == segment)[:, :, None, None], noise, x)


@pytest.mark.parametrize("layout", ["back_to_back", "split"])
def test_nothing_of_a_segment_reaches_another(layout):
  """Perturbing one segment's queries, keys and values leaves every other position's output
  bit for bit unchanged, in unaligned layouts and with segments split in several runs."""
  q, k, v = _inputs(100, seed=20)
  segment_ids = _segments(100, layout, seed=21)
  for query_mode, causal, chunk_size in [("sample", True, 32), ("fine", False, 512),
                                         ("mean", False, 32)]:
    options = dict(block_size=4, causal=causal, query_mode=query_mode,
                   segment_ids=segment_ids, chunk_size=chunk_size)
    base = np.asarray(_quiet(_fast_chunked, q, k, v, **options))
    for segment in (2, 3):
      moved = _quiet(_fast_chunked, *(_perturb_segment(x, segment_ids, segment, seed=i)
                                      for i, x in enumerate((q, k, v))), **options)
      inside = np.asarray(segment_ids == segment)
      np.testing.assert_array_equal(np.asarray(moved)[~inside], base[~inside])
      assert np.abs(np.asarray(moved)[inside] - base[inside]).max() > 1e-2


_fast_chunked = jax.jit(hierarchical_attention, static_argnames=_STATIC + ("chunk_size",))


def test_segments_with_large_logits_stay_finite_and_bfloat16_stays_close():
  q, k, v = _inputs(100, seed=22)
  options = dict(block_size=4, query_mode="sample", segment_ids=_segments(100, "back_to_back"))
  got = np.asarray(_fast(q * 10.0, k * 10.0, v, **options))  # logits x 100
  real = np.asarray(options["segment_ids"]) > 0
  assert np.isfinite(got).all() and (np.abs(got[real]).sum(-1) > 1e-3).all()
  assert (got[~real] == 0).all()  # padding rows see nothing
  np.testing.assert_allclose(got, _reference(q * 10.0, k * 10.0, v, **options), atol=1e-4,
                             rtol=1e-4)
  bf16 = _fast(*(x.astype(jnp.bfloat16) for x in (q, k, v)), **options)
  np.testing.assert_allclose(bf16.astype(jnp.float32), _fast(q, k, v, **options),
                             atol=BF16_ATOL, rtol=0)
