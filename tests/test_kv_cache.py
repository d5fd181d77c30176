"""Tests for hattention/kv_cache.py: the full-attention decoding step."""

import jax
import jax.numpy as jnp
import numpy as np

from hattention import kv_cache_step

BATCH, HEADS, DIM = 2, 2, 8


def test_kv_cache_step_matches_causal_dot_product_attention():
  """Stepping the full-attention KV cache reproduces causal dense attention."""
  length, max_length = 9, 12
  query, key, value = (jax.random.normal(k, (BATCH, length, HEADS, DIM))
                       for k in jax.random.split(jax.random.PRNGKey(3), 3))

  def body(i, carry):
    keys, values, outs = carry
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
    out, keys, values = kv_cache_step(keys, values, take(query), take(key), take(value), i)
    return keys, values, jax.lax.dynamic_update_slice_in_dim(outs, out, i, axis=1)

  cache = jnp.full((BATCH * HEADS, max_length, DIM), 7.0)  # stale slots must stay unseen
  _, _, outs = jax.jit(lambda c: jax.lax.fori_loop(
      0, length, body, (c, c, jnp.zeros_like(query))))(cache)
  expected = jax.nn.dot_product_attention(query, key, value, is_causal=True)
  np.testing.assert_allclose(outs, expected, atol=1e-5, rtol=1e-5)
