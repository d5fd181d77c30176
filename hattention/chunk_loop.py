"""A loop over chunks of positions whose backward pass recomputes each chunk.

`run_chunks(chunk_fn, num_chunks, rows, per_chunk, shared)` computes, for every chunk c,
chunk_fn(c, rows of chunk c, per_chunk entry c, shared) and writes it at the chunk's
positions. With several chunks it runs in a `fori_loop` under a custom VJP: the forward
keeps nothing but the inputs, and the backward pass recomputes each chunk's forward and
pulls the output gradient back through it, so temporaries stay the size of one chunk
whatever the length. Forward-mode differentiation needs a single chunk (then chunk_fn
runs once, plainly).

Nothing here knows about attention: `hattention.schedule` supplies the chunk function.
"""

import functools

import jax
import jax.numpy as jnp


def _chunk_inputs(c, size: int, rows, per_chunk):
  """(rows, per_chunk) of chunk c (traced): positions c * size ... on axis 2, entry c."""
  take_rows = lambda y: jax.lax.dynamic_slice_in_dim(y, c * size, size, axis=2)
  take_entry = lambda y: jax.lax.dynamic_index_in_dim(y, c, axis=2, keepdims=False)
  return jax.tree.map(take_rows, rows), jax.tree.map(take_entry, per_chunk)


def _split_floats(tree):
  """(float leaves of tree, rebuild): rebuild(floats) puts new float leaves in place;
  rebuild(floats, others=None) also puts None for the other (integer) leaves."""
  leaves, treedef = jax.tree.flatten(tree)
  is_float = [jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves]

  def rebuild(floats, others=leaves):
    floats = iter(floats)
    return treedef.unflatten([next(floats) if f else (None if others is None else other)
                              for f, other in zip(is_float, leaves)])
  return [leaf for leaf, f in zip(leaves, is_float) if f], rebuild


def _chunk_size(rows, num_chunks: int) -> int:
  return jax.tree.leaves(rows)[0].shape[2] // num_chunks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recomputed(chunk_fn, num_chunks: int, rows, per_chunk, shared):
  """chunk_fn of every chunk, concatenated along axis 2 (see `run_chunks`)."""
  size = _chunk_size(rows, num_chunks)
  out_c = jax.eval_shape(chunk_fn, 0, *_chunk_inputs(0, size, rows, per_chunk), shared)
  out = jnp.zeros(out_c.shape[:2] + (num_chunks * size,) + out_c.shape[3:], out_c.dtype)

  def step(c, out):
    out_c = chunk_fn(c, *_chunk_inputs(c, size, rows, per_chunk), shared)
    return jax.lax.dynamic_update_slice_in_dim(out, out_c, c * size, axis=2)
  return jax.lax.fori_loop(0, num_chunks, step, out)


def _recomputed_fwd(chunk_fn, num_chunks, rows, per_chunk, shared):
  return _recomputed(chunk_fn, num_chunks, rows, per_chunk, shared), (rows, per_chunk, shared)


def _recomputed_bwd(chunk_fn, num_chunks, residuals, d_out):
  """Per chunk: recompute, pull d_out back, write the chunk's gradients (the shared
  inputs' gradient is the sum over chunks).

  Only float inputs get gradients (integer leaves such as segment ids: None).
  """
  rows, per_chunk, shared = residuals
  size = _chunk_size(rows, num_chunks)
  floats, rebuild = _split_floats((rows, per_chunk))

  def step(c, carry):
    grads, d_shared = carry
    inputs = _chunk_inputs(c, size, rows, per_chunk)
    input_floats, input_rebuild = _split_floats(inputs)
    d_out_c = jax.lax.dynamic_slice_in_dim(d_out, c * size, size, axis=2)
    _, pull = jax.vjp(lambda f, s: chunk_fn(c, *input_rebuild(f), s), input_floats, shared)
    d_floats, d_shared_c = pull(d_out_c)
    d_rows, d_per_chunk = input_rebuild(d_floats, others=None)
    put_rows = lambda g, d: jax.lax.dynamic_update_slice_in_dim(g, d, c * size, axis=2)
    put_entry = lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d, c, axis=2)
    grad_rows, grad_per_chunk = rebuild(grads, others=None)
    grads = _split_floats((jax.tree.map(put_rows, grad_rows, d_rows),
                           jax.tree.map(put_entry, grad_per_chunk, d_per_chunk)))[0]
    return grads, jax.tree.map(jnp.add, d_shared, d_shared_c)

  start = ([jnp.zeros_like(f) for f in floats], jax.tree.map(jnp.zeros_like, shared))
  grads, d_shared = jax.lax.fori_loop(0, num_chunks, step, start)
  return (*rebuild(grads, others=None), d_shared)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def run_chunks(chunk_fn, num_chunks: int, rows, per_chunk, shared):
  """chunk_fn(c, rows_c, per_chunk_c, shared) of every chunk c, along axis 2.

  chunk_fn: a pure function returning [batch, heads, size, ...] for chunk c (an int, or
  traced with several chunks); it must be hashable (a module-level function or a
  functools.partial of one). rows: pytree of arrays [batch, heads|1, num_chunks * size,
  ...], chunk c reads positions c * size ... (c + 1) * size - 1; per_chunk: pytree of
  arrays with a chunk axis at position 2 ([batch, heads|1, num_chunks, ...]), chunk c
  reads entry c without that axis; shared: pytree of float arrays (or None) that every
  chunk reads whole. Returns [batch, heads, num_chunks * size, ...].
  """
  if num_chunks == 1:
    return chunk_fn(0, rows, jax.tree.map(lambda y: y[:, :, 0], per_chunk), shared)
  return _recomputed(chunk_fn, num_chunks, rows, per_chunk, shared)
