"""Tests for hattention/kv_cache.py: the full-attention decoding step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hattention import kv_cache_step

BATCH, HEADS, DIM = 2, 2, 8


@pytest.mark.parametrize("bias_shape", [None, (HEADS,), (BATCH, 1)])
def test_kv_cache_step_matches_causal_dot_product_attention(bias_shape):
  """Stepping the full-attention KV cache reproduces causal dense attention, with or without a
  logit bias given as one row [*bias_shape, max_len] per step."""
  length, max_length = 9, 12
  query, key, value = (jax.random.normal(k, (BATCH, length, HEADS, DIM))
                       for k in jax.random.split(jax.random.PRNGKey(3), 3))
  bias, rows = None, None
  if bias_shape is not None:  # [*bias_shape, length, length]; the slots after length unseen
    bias = jax.random.normal(jax.random.PRNGKey(4), bias_shape + (length, length))
    rows = jnp.pad(bias, [(0, 0)] * len(bias_shape) + [(0, 0), (0, max_length - length)],
                   constant_values=50.0)

  def body(i, carry):
    keys, values, outs = carry
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
    row = None if rows is None else rows[..., i, :]
    out, keys, values = kv_cache_step(keys, values, take(query), take(key), take(value), i,
                                      bias=row)
    return keys, values, jax.lax.dynamic_update_slice_in_dim(outs, out, i, axis=1)

  cache = jnp.full((BATCH * HEADS, max_length, DIM), 7.0)  # stale slots must stay unseen
  _, _, outs = jax.jit(lambda c: jax.lax.fori_loop(
      0, length, body, (c, c, jnp.zeros_like(query))))(cache)
  dense_bias = None if bias is None else bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  expected = jax.nn.dot_product_attention(query, key, value, bias=dense_bias, is_causal=True)
  np.testing.assert_allclose(outs, expected, atol=1e-5, rtol=1e-5)
