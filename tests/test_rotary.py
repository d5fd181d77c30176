"""Tests for lm1b/rotary.py: rotations that make query-key products depend on relative position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm1b import rotary


def _normal(seed: int, shape) -> jnp.ndarray:
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _logits(query, key, positions_q, positions_k):
  """[batch, heads, length_q, length_k] products of rotated queries and keys."""
  return jnp.einsum("bqhd,bkhd->bhqk", rotary.rotate(query, positions_q),
                    rotary.rotate(key, positions_k))


def test_products_depend_on_relative_position_only():
  query, key = _normal(0, (2, 5, 3, 8)), _normal(1, (2, 7, 3, 8))
  positions_q = jnp.array([[0, 3, 9, 40, 41], [2, 2, 5, 100, 7]])
  positions_k = jnp.array([[1, 2, 3, 4, 5, 6, 900], [0, 0, 11, 13, 17, 19, 23]])
  base = _logits(query, key, positions_q, positions_k)
  shifted = _logits(query, key, positions_q + 1000, positions_k + 1000)
  np.testing.assert_allclose(base, shifted, atol=2e-4, rtol=1e-4)
  # and the products do change with the relative position
  moved = _logits(query, key, positions_q + 3, positions_k)
  assert np.max(np.abs(moved - base)) > 0.1


def test_position_zero_is_identity_and_norms_are_kept():
  x = _normal(2, (1, 4, 2, 6))
  np.testing.assert_array_equal(rotary.rotate(x, jnp.zeros((1, 4), jnp.int32)), x)
  rotated = rotary.rotate(x, jnp.array([[1, 5, 77, 4096]]))
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  assert not np.allclose(rotated, x)


def test_keeps_dtype_and_rejects_odd_head_dim():
  x = _normal(3, (1, 3, 1, 4)).astype(jnp.bfloat16)
  assert rotary.rotate(x, jnp.array([[0, 1, 2]])).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="even head_dim"):
    rotary.rotate(jnp.zeros((1, 3, 1, 5)), jnp.array([[0, 1, 2]]))
