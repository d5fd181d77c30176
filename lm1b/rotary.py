"""Rotary position encoding: queries and keys rotated by angles proportional to their position.

Feature pairs (i, i + head_dim/2) of a head are rotated by the angle position * base**(-2i /
head_dim), i = 0..head_dim/2-1, so that the logit q_m . k_n depends on the positions m and n only
through m - n. Nothing is learned, and every position up to any length is usable; attention that
averages keys (the coarse levels of hierarchical attention, which average keys of 2**l
consecutive positions) averages rotated keys, the same in training and in decoding.

`rotation` computes the angles' cosines and sines once per forward pass; `apply` uses them for
the queries and keys of every layer.
"""

import jax.numpy as jnp


def rotation(positions, head_dim: int, base: float = 10000.0):
  """(cos, sin), each float32 [batch, length, 1, head_dim // 2], for `positions` [batch, length].

  head_dim must be even.
  """
  if head_dim % 2:
    raise ValueError(f"rotary position encoding needs an even head_dim, got {head_dim}")
  half = head_dim // 2
  inverse_frequency = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, :, None, None] * inverse_frequency
  return jnp.cos(angle), jnp.sin(angle)


def apply(x, cos_sin):
  """x [batch, length, heads, head_dim] rotated by `rotation`'s (cos, sin); x's dtype.

  The products are computed in float32.
  """
  cos, sin = cos_sin
  half = x.shape[-1] // 2
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
  return rotated.astype(x.dtype)


def rotate(x, positions, base: float = 10000.0):
  """x [batch, length, heads, head_dim] rotated by `positions` [batch, length] (int)."""
  return apply(x, rotation(positions, x.shape[-1], base))
