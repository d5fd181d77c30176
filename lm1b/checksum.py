"""Checksums of array PyTrees, computed where the arrays are (jitted, no gather to a host).

Each array gets a 64-bit digest made of two 32-bit lanes. Lane `s` is

    sum over elements i of  fmix32(bits[i] ^ (i * multiplier_s + offset_s))   (mod 2^32)

where bits[i] is the element's bit pattern widened to uint32, i its flat (row-major) index
and fmix32 the MurmurHash3 finaliser, a bijection of uint32 with full avalanche. Because
of the bijection, changing any single element (one flipped bit included) always changes
both lanes; the index term makes the digest depend on where each value sits; larger
damage goes undetected with probability about 2^-64. The sum is an integer sum modulo
2^32, so it is exact in any order: the digest is the same on one device, on a mesh and
over several processes, and XLA computes it as a local reduction plus an all-reduce of
two scalars per array.

64-bit elements are hashed as two uint32 words each; flat indices wrap past 2^32 elements
(harmless: the digest stays position-dependent).
"""

import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# (multiplier, offset) of the flat index in each lane: odd multipliers, digits of pi and phi.
_LANES = ((0x9E3779B9, 0x243F6A88), (0x7FEB352D, 0x85A308D3))
_WIDE_TYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 -> uint32, bijective)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits_as_uint32(x: jax.Array) -> jax.Array:
  """Bit patterns as uint32: same shape, or [..., 2] for 64-bit dtypes."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  itemsize = jnp.dtype(x.dtype).itemsize
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"cannot checksum arrays of dtype {x.dtype}")
  if itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if itemsize not in _WIDE_TYPES:
    raise TypeError(f"cannot checksum arrays of dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, _WIDE_TYPES[itemsize]).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 [*shape]: the row-major flat index of every element (elementwise, shardable)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
        stride % (1 << 32))
    stride *= shape[axis]
  return index


def _lanes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two uint32 [] lanes of one array's digest (scalars, so replicated when x is
  sharded)."""
  bits = _bits_as_uint32(x)
  index = _flat_index(bits.shape)
  multipliers = jnp.array([m for m, _ in _LANES], jnp.uint32)
  offsets = jnp.array([o for _, o in _LANES], jnp.uint32)
  mixed = _fmix32(bits[..., None] ^ (index[..., None] * multipliers + offsets))
  lanes = jnp.sum(mixed, axis=tuple(range(bits.ndim)), dtype=jnp.uint32)  # no reshape:
  # merging a sharded axis with others would move data between devices
  return lanes[0], lanes[1]


@jax.jit
def _tree_lanes(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """_lanes of every leaf, in one program: every process runs the same single program, whose
  collectives (the sums of sharded arrays) cannot interleave differently across processes, as
  a program per leaf dispatched asynchronously could (that deadlocked two processes)."""
  return [_lanes(x) for x in leaves]


def path_name(path: tuple) -> str:
  """'block_0/attention/query/kernel' for a jax tree path (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _value(scalar: jax.Array) -> int:
  """A replicated scalar's value, read from this process's first shard (multi-process safe)."""
  return int(np.asarray(scalar.addressable_shards[0].data))


def tree_checksums(tree: Any) -> dict[str, str]:
  """{path_name: 16 hex digits} of every array leaf of `tree`, in tree order.

  tree: PyTree of jax.Arrays (any sharding, also spanning processes: every process must call
  this with its part of the same global arrays) or numpy arrays / Python numbers (hashed on
  the default device). Blocks until the digests are computed; only two uint32 scalars per
  leaf leave the devices.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  lanes = jax.block_until_ready(_tree_lanes(
      [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in flat]))
  return {path_name(path): "".join(f"{_value(lane):08x}" for lane in pair)
          for (path, _), pair in zip(flat, lanes)}


def text_digest(text: str) -> str:
  """sha256 hex digest of a string (UTF-8)."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_digest(value: Mapping[str, Any]) -> str:
  """sha256 of the canonical JSON (sorted keys) of a JSON-serialisable mapping."""
  return text_digest(json.dumps(value, sort_keys=True))
