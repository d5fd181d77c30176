"""Tests for hattention/decode.py: stepwise decoding equals causal attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hattention import decode_step, hierarchical_attention, init_cache
from hattention.reference import hierarchical_attention_reference

BATCH, HEADS, DIM = 2, 2, 8
_STATIC = ("block_size", "causal", "query_mode", "num_levels")
# Jitted once per configuration: far cheaper on CPU than op-by-op dispatch.
_reference = jax.jit(hierarchical_attention_reference, static_argnames=_STATIC)
_fast = jax.jit(hierarchical_attention, static_argnames=_STATIC)


def _inputs(length: int, seed: int = 0, dtype=jnp.float32):
  """query, key, value: [BATCH, length, HEADS, DIM]."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (BATCH, length, HEADS, DIM), dtype)
               for k in keys)


@functools.partial(jax.jit, static_argnames=("max_length", "block_size",
                                             "query_mode", "num_levels",
                                             "dtype"))
def _decode_all(query, key, value, *, max_length, block_size, query_mode,
                num_levels=None, dtype=jnp.float32):
  """Scans decode_step per position; returns [batch, length, heads, dim]."""
  cache = init_cache(query.shape[0], max_length, query.shape[2],
                     query.shape[3], block_size=block_size,
                     query_mode=query_mode, dtype=dtype, num_levels=num_levels)

  def step(cache, qkv):
    out, cache = decode_step(cache, *(x[:, None] for x in qkv))
    return cache, out[:, 0]

  time_major = tuple(jnp.swapaxes(x, 0, 1) for x in (query, key, value))
  _, outs = jax.lax.scan(step, cache, time_major)
  return jnp.swapaxes(outs, 0, 1)


CASES = [  # (length, max_length, block_size, query_mode)
    (1, 1, 2, "sample"),
    (7, 7, 2, "fine"),
    (7, 9, 2, "sample"),
    (37, 64, 2, "sample"),
    (37, 40, 4, "fine"),
    (37, 37, 4, "sample"),
    (100, 130, 4, "fine"),
    (100, 100, 16, "sample"),
    (100, 128, 16, "fine"),
    (300, 300, 2, "sample"),  # every ring buffer but the top level's wraps
]


@pytest.mark.parametrize("length,max_length,block_size,query_mode", CASES)
def test_decode_matches_full_causal_forward(length, max_length, block_size,
                                            query_mode):
  q, k, v = _inputs(length, seed=length + block_size)
  got = _decode_all(q, k, v, max_length=max_length, block_size=block_size,
                    query_mode=query_mode)
  options = dict(block_size=block_size, causal=True, query_mode=query_mode)
  want = _reference(q, k, v, **options)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  fast = _fast(q, k, v, **options)
  np.testing.assert_allclose(got, fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_levels", [1, 2])
def test_num_levels_matches_reference(num_levels):
  q, k, v = _inputs(37, seed=3)
  options = dict(block_size=2, query_mode="sample", num_levels=num_levels)
  got = _decode_all(q, k, v, max_length=50, **options)
  want = _reference(q, k, v, causal=True, **options)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Dropping levels must matter at this length, or the comparison is vacuous.
  full = _reference(q, k, v, causal=True, block_size=2)
  assert np.abs(np.asarray(want - full)).max() > 1e-3


def test_query_modes_differ():
  q, k, v = _inputs(37, seed=5)
  sample = _decode_all(q, k, v, max_length=64, block_size=2,
                       query_mode="sample")
  fine = _decode_all(q, k, v, max_length=64, block_size=2, query_mode="fine")
  assert np.abs(np.asarray(sample - fine)).max() > 1e-3


def test_no_retrace_per_step():
  traces = []

  @jax.jit
  def step(cache, query, key, value):
    traces.append(1)
    return decode_step(cache, query, key, value)

  q, k, v = _inputs(7, seed=7)
  cache = init_cache(BATCH, 7, HEADS, DIM, block_size=2)
  outs = []
  for t in range(7):
    out, cache = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  assert len(traces) == 1
  assert int(cache.position) == 7
  want = _reference(q, k, v, block_size=2)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5)


def test_cache_in_while_loop():
  length = 23
  q, k, v = _inputs(length, seed=11)
  cache = init_cache(BATCH, 32, HEADS, DIM, block_size=4, query_mode="fine")

  def body(carry):
    cache, outs = carry
    t = cache.position
    qkv = (jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1) for x in (q, k, v))
    out, cache = decode_step(cache, *qkv)
    return cache, jax.lax.dynamic_update_slice_in_dim(outs, out, t, axis=1)

  cond = lambda carry: carry[0].position < length
  cache, outs = jax.jit(lambda c: jax.lax.while_loop(
      cond, body, (c, jnp.zeros_like(q))))(cache)
  assert int(cache.position) == length
  want = _reference(q, k, v, block_size=4, query_mode="fine")
  np.testing.assert_allclose(outs, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_cache_close_to_float32():
  q, k, v = _inputs(100, seed=13)
  f32 = _decode_all(q, k, v, max_length=100, block_size=4,
                    query_mode="sample")
  bf16 = _decode_all(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                     max_length=100, block_size=4, query_mode="sample",
                     dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(jnp.float32), f32, atol=5e-2)


def test_position_past_capacity_gives_nan():
  q, k, v = _inputs(5, seed=17)
  got = _decode_all(q, k, v, max_length=4, block_size=2, query_mode="sample")
  assert np.isfinite(np.asarray(got[:, :4])).all()
  assert np.isnan(np.asarray(got[:, 4])).all()


def _leaf_shapes(cache) -> list:
  return [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(cache)]


def test_cache_size_does_not_depend_on_max_length():
  small, large = (init_cache(BATCH, n, HEADS, DIM, block_size=4, num_levels=3)
                  for n in (64, 1 << 20))
  assert _leaf_shapes(small) == _leaf_shapes(large)
  # Uncapped, only the level count M = log2(padded / b) grows with max_length.
  block = 16
  cache = init_cache(BATCH, 1 << 20, HEADS, DIM, block_size=block)
  levels = 16
  assert cache.num_levels == levels
  elements = sum(leaf.size for leaf in jax.tree_util.tree_leaves(cache))
  per_level = BATCH * HEADS * DIM * (4 * block + 1)
  assert elements <= levels * per_level + 1


def test_compiled_step_cost_does_not_depend_on_max_length():
  x = jnp.zeros((BATCH, 1, HEADS, DIM))
  stats = []
  for max_length in (64, 1 << 16):
    cache = init_cache(BATCH, max_length, HEADS, DIM, block_size=4,
                       num_levels=3)
    compiled = jax.jit(decode_step).lower(cache, x, x, x).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats.append((memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                  memory.output_size_in_bytes, cost.get("flops"),
                  cost.get("bytes accessed")))
  assert stats[0] == stats[1]
  # The cache arguments are a few KiB, not O(max_length) (64k positions of
  # float32 keys alone would be 4 MiB here).
  assert stats[1][0] < 64 * 1024


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_mode="mean"), "query_mode"),
    (dict(query_mode="coarse"), "query_mode"),
    (dict(block_size=3), "block_size"),
    (dict(block_size=1), "block_size"),
    (dict(num_levels=0), "num_levels"),
])
def test_init_cache_rejects_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    init_cache(BATCH, 16, HEADS, DIM, **kwargs)


def test_init_cache_rejects_bad_sizes():
  with pytest.raises(ValueError, match="max_length"):
    init_cache(BATCH, 0, HEADS, DIM)


@pytest.mark.parametrize("shape", [(BATCH, 2, HEADS, DIM), (BATCH, 1, HEADS),
                                   (BATCH, 1, HEADS, DIM + 1)])
def test_decode_step_rejects_bad_shapes(shape):
  cache = init_cache(BATCH, 16, HEADS, DIM)
  good = jnp.zeros((BATCH, 1, HEADS, DIM))
  with pytest.raises(ValueError, match="key.shape"):
    decode_step(cache, good, jnp.zeros(shape), good)
