"""Causal full attention by JAX's Pallas TPU flash-attention kernel, for
`ModelConfig.full_attention_kernel = "flash"`.

The kernel works block by block (128 x 128 here) with an online softmax and skips the blocks
above the diagonal, so the [length, length] scores never sit in HBM and rows can be far longer
than with XLA's attention. A Pallas call cannot be partitioned by XLA, so under a mesh it runs
in a shard_map over the rows' and heads' mesh axes: every device runs the kernel on its own
rows and heads, with no communication. For a TPU it is the Mosaic kernel; for any other
platform the model uses XLA's attention instead (used_here), except inside interpret_off_tpu(),
where the same kernel runs in Pallas's TPU interpreter (the CPU tests). The platform is the
mesh's (else the default backend's), so a TPU compile from a CPU machine (lm1b.tpu_compile)
gets the real kernel.

(JAX's "splash" kernel, its sparse-mask successor, was tried first: it preprocesses the causal
mask in numpy at trace time, O(length**2) per head, which took over ten minutes at 16k
positions; the flash kernel has no such step.)
"""

import contextlib
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

ROW_MULTIPLE = 128  # the kernel's block along the rows
_BLOCK = 128


def _kernel(query, key, value, segment_ids):
  """[B, H, L, D] attention by the Pallas kernel."""
  # pylint: disable=import-outside-toplevel  (Pallas's TPU ops load Mosaic; only when used)
  from jax.experimental.pallas.ops.tpu import flash_attention
  blocks = flash_attention.BlockSizes(
      block_q=_BLOCK, block_k_major=_BLOCK, block_k=_BLOCK, block_b=1,
      block_q_major_dkv=_BLOCK, block_k_major_dkv=_BLOCK, block_k_dkv=_BLOCK,
      block_q_dkv=_BLOCK, block_k_major_dq=_BLOCK, block_k_dq=_BLOCK, block_q_dq=_BLOCK)
  return flash_attention.flash_attention(
      query, key, value, segment_ids=flash_attention.SegmentIds(q=segment_ids, kv=segment_ids),
      causal=True, sm_scale=query.shape[-1]**-0.5, block_sizes=blocks)


def _interpreted(query, key, value, segment_ids):
  """`_kernel` run by Pallas's TPU interpreter, its backward pass included (the interpreter
  is chosen by a context, so the kernel's own VJP is traced inside it too)."""
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import tpu as pltpu

  @jax.custom_vjp
  def attend(q, k, v, segments):
    with pltpu.force_tpu_interpret_mode():
      return _kernel(q, k, v, segments)

  def forward(q, k, v, segments):
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(lambda *qkv: _kernel(*qkv, segments), q, k, v)

  def backward(vjp, cotangent):
    with pltpu.force_tpu_interpret_mode():
      return (*vjp(cotangent), None)  # None: no cotangent for the integer segment ids

  attend.defvjp(forward, backward)
  return attend(query, key, value, segment_ids)


_INTERPRET_OFF_TPU = threading.local()


@contextlib.contextmanager
def interpret_off_tpu() -> Iterator[None]:
  """Within it, programs traced for another platform than TPU run the kernel in Pallas's
  interpreter (what the CPU tests check) instead of XLA's attention."""
  before = getattr(_INTERPRET_OFF_TPU, "on", False)
  _INTERPRET_OFF_TPU.on = True
  try:
    yield
  finally:
    _INTERPRET_OFF_TPU.on = before


def used_here() -> bool:
  """Whether the program being traced runs the kernel: always for TPU; for other platforms
  only inside interpret_off_tpu() (else the model uses XLA's attention, the same numbers, so a
  model trained with the kernel evaluates and samples at full speed on a CPU or GPU)."""
  return _on_tpu() or getattr(_INTERPRET_OFF_TPU, "on", False)


def _on_tpu() -> bool:
  """Whether the program being traced is for TPU: the platform of the mesh in context (a TPU
  topology's, when lm1b.tpu_compile compiles for one from a CPU machine), else the default
  backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is not None:
    return device.platform == "tpu"
  return jax.default_backend() == "tpu"


def _local(query, key, value, segment_ids):
  """Attention of one device's rows and heads; shapes as in `flash_attention`."""
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, H, D] <-> [B, H, L, D]
  attend = _kernel if _on_tpu() else _interpreted
  return to_heads(attend(to_heads(query), to_heads(key), to_heads(value), segment_ids))


def flash_attention(query, key, value, segment_ids=None, spec: PartitionSpec | None = None):
  """Causal softmax attention, each segment attending only to itself.

  Args:
    query, key, value: [batch, length, heads, head_dim]; length a multiple of 128.
    segment_ids: optional [batch, length] int32 (None: one segment per row).
    spec: how query, key and value are laid out over the mesh in context (rows and heads
      split, length and head_dim whole), e.g. nn.logical_to_mesh_axes of the model's head
      axes; unused without a mesh.

  Returns:
    [batch, length, heads, head_dim] in query's dtype.
  """
  batch, length, _, _ = query.shape
  if length % ROW_MULTIPLE:
    raise ValueError(f"flash attention needs rows of a multiple of {ROW_MULTIPLE} positions, "
                     f"got {length}: set build_inputs.seq_len (and ModelConfig.max_len) to one")
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  if jax.sharding.get_abstract_mesh().empty:
    return _local(query, key, value, segment_ids)
  spec = PartitionSpec(*(spec or ()), *(None,) * (4 - len(spec or ())))
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(f"flash attention runs on whole rows and heads, got layout {spec}")
  return jax.shard_map(_local, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)),
                       out_specs=spec, check_vma=False)(query, key, value, segment_ids)
