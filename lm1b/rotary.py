"""Rotary position encoding: queries and keys rotated by angles proportional to their position.

Feature pairs (i, i + head_dim/2) of a head are rotated by the angle position * base**(-2i /
head_dim), i = 0..head_dim/2-1, so that the logit q_m . k_n depends on the positions m and n only
through m - n. Nothing is learned, and every position up to any length is usable; attention that
averages keys (the coarse levels of hierarchical attention, which average keys of 2**l
consecutive positions) averages rotated keys, the same in training and in decoding.
"""

import jax.numpy as jnp


def rotate(x, positions, base: float = 10000.0):
  """x [batch, length, heads, head_dim] rotated by `positions` [batch, length] (int).

  head_dim must be even. Angles are computed in float32; the result has x's dtype.
  """
  half = x.shape[-1] // 2
  if 2 * half != x.shape[-1]:
    raise ValueError(f"rotary position encoding needs an even head_dim, got {x.shape[-1]}")
  inverse_frequency = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, :, None, None] * inverse_frequency
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
  return rotated.astype(x.dtype)
