"""Tests for lm1b.checksum: the documented formula, sensitivity to any single change and to
positions, tree paths, dtypes (sharding independence is checked in test_checkpoints)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm1b import checksum


def _fmix32(h: np.ndarray) -> np.ndarray:
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _numpy_digest(x: np.ndarray) -> str:
  """The module docstring's formula, written independently in numpy (uint32 wraps)."""
  bits = x.reshape(-1).view(np.uint32)
  index = np.arange(bits.size, dtype=np.uint32)
  lanes = [int(_fmix32(bits ^ (index * np.uint32(m) + np.uint32(o))).sum(dtype=np.uint32))
           for m, o in ((0x9E3779B9, 0x243F6A88), (0x7FEB352D, 0x85A308D3))]
  return "".join(f"{lane:08x}" for lane in lanes)


X = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)


def test_matches_the_documented_formula():
  with np.errstate(over="ignore"):
    expected = _numpy_digest(X)
  assert checksum.tree_checksums({"x": jnp.asarray(X)}) == {"x": expected}
  assert checksum.tree_checksums({"x": X}) == {"x": expected}  # host arrays too


def _flip(x: np.ndarray, index: tuple, bit: int) -> np.ndarray:
  flipped = x.copy()
  flat = flipped.reshape(-1).view(np.dtype(f"u{x.dtype.itemsize}"))
  flat[np.ravel_multi_index(index, x.shape)] ^= 1 << bit
  return flipped


@pytest.mark.parametrize("dtype", [np.float32, np.int32, jnp.bfloat16, np.uint8])
def test_every_single_bit_flip_changes_both_lanes(dtype):
  x = (np.abs(X) * 50).astype(dtype)
  (base,) = checksum.tree_checksums([jnp.asarray(x)]).values()
  bits = 8 * np.dtype(dtype).itemsize
  flipped = [jnp.asarray(_flip(x, (i % 5, i % 7), i)) for i in range(bits)]
  for digest in checksum.tree_checksums(flipped).values():
    assert digest[:8] != base[:8] and digest[8:] != base[8:]


def test_position_matters():
  swapped = X.copy()
  swapped[[0, 4]] = swapped[[4, 0]]
  transposed = np.ascontiguousarray(X[:5, :5].T)
  digests = checksum.tree_checksums([X, swapped, X[:5, :5], transposed, X.reshape(7, 5)])
  assert len(set(digests.values())) == 4  # a reshape keeps the flat order, so the digest
  assert digests["0"] == digests["4"]


def test_paths_bools_scalars_and_empty_arrays():
  tree = {"params": {"block_0": {"kernel": jnp.ones((2, 3))}}, "opt": (jnp.array(True),),
          "step": 7, "empty": jnp.zeros((0, 4))}
  digests = checksum.tree_checksums(tree)
  assert list(digests) == ["empty", "opt/0", "params/block_0/kernel", "step"]
  assert digests["empty"] == "0000000000000000"
  assert all(len(d) == 16 for d in digests.values())
  assert checksum.tree_checksums({"b": jnp.array(False)}) != checksum.tree_checksums(
      {"b": jnp.array(True)})
  with pytest.raises(TypeError, match="complex64"):
    checksum.tree_checksums([jnp.zeros(2, jnp.complex64)])


def test_text_and_json_digests():
  assert checksum.text_digest("a") == (
      "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb")
  assert checksum.json_digest({"b": 1, "a": 2}) == checksum.json_digest({"a": 2, "b": 1})
  assert checksum.json_digest({"a": 1}) != checksum.json_digest({"a": 2})


def test_named_tuple_and_attribute_paths():
  state = jax.tree_util.tree_flatten_with_path(
      {"opt": [{"mu": jnp.ones(1)}], "x": jnp.ones(1)})[0]
  assert [checksum.path_name(path) for path, _ in state] == ["opt/0/mu", "x"]
