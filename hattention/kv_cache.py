"""Full-attention decoding step against a key/value cache (the dense baseline).

The hierarchical cache of `hattention.decode` is measured against this step, and
the full-attention model decodes with it. The cache is [batch * heads, max_len,
head_dim]: position-major per (batch, head) row, so a step writes one slot in
place and reads the cache with two batched matrix-vector products. The heads are
folded into the leading axis on purpose: carried through a loop, a 4-D [batch,
heads, max_len, head_dim] cache made XLA on CPU copy it at every step (7-23x
slower per token at 1k-4k positions with 1 and 8 heads, jaxlib 0.10.2).
"""

import math

import jax
import jax.numpy as jnp


def kv_cache_step(keys, values, query, key, value, position, bias=None):
  """One causal full-attention step; returns (out, keys, values).

  keys, values: [batch * heads, max_len, head_dim] cache in any dtype (the new
  entry is cast to it); query, key, value: [batch, 1, heads, head_dim];
  position: int32 scalar (may be traced), the slot written and the last slot
  attended; bias: optional float32 broadcastable to [batch, heads, max_len]
  (e.g. [heads, max_len]), added to the scaled logits of the row at `position`
  (a relative position bias). Logits are scaled by 1/sqrt(head_dim), slots
  after `position` are masked and the softmax runs in float32. out: [batch, 1,
  heads, head_dim] in query's dtype.
  """
  batch, _, heads, dim = query.shape
  rows = lambda x: x.reshape(batch * heads, dim).astype(keys.dtype)
  keys = jax.lax.dynamic_update_slice_in_dim(keys, rows(key)[:, None], position, axis=1)
  values = jax.lax.dynamic_update_slice_in_dim(values, rows(value)[:, None], position, axis=1)
  logits = jnp.einsum("nd,nld->nl", rows(query), keys,
                      preferred_element_type=jnp.float32) / math.sqrt(dim)
  if bias is not None:
    logits = (logits.reshape(batch, heads, -1) + bias).reshape(batch * heads, -1)
  logits = jnp.where(jnp.arange(keys.shape[1]) <= position, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
  out = jnp.einsum("nl,nld->nd", probs, values, preferred_element_type=jnp.float32)
  return out.reshape(batch, 1, heads, dim).astype(query.dtype), keys, values
