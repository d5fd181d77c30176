"""Temporaries of one attention layer's forward + backward on one TPU v5e chip, compiled with
libtpu on this CPU machine (no chip): hierarchical vs full attention, with and without
segment_ids, at the 53M train step's per-chip shapes on a v5e-8 (32 rows x 256 positions,
8 heads x 64, bfloat16). Why the hierarchical train step needs more temporaries.

  python -m benchmarks.tpu_attention_memory     (needs requirements-tpu.txt)
"""

import os
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from hattention import hierarchical_attention
from lm1b import tpu_compile

BATCH, LENGTH, HEADS, HEAD_DIM = 32, 256, 8, 64


def _full(q, k, v, segment_ids):
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


def _hierarchical(q, k, v, segment_ids):
  return hierarchical_attention(q, k, v, block_size=16, causal=True, query_mode="sample",
                                segment_ids=segment_ids)


def measure(attention, with_segments: bool, device) -> tuple[float, float]:
  """(temporary MiB, compile seconds) of d(sum attention)/d(q, k, v) on `device`."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  qkv = jax.ShapeDtypeStruct((BATCH, LENGTH, HEADS, HEAD_DIM), jnp.bfloat16, sharding=sharding)
  segments = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32, sharding=sharding)

  def loss(q, k, v, s):
    return attention(q, k, v, s if with_segments else None).astype(jnp.float32).sum()

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, segments).compile()
  seconds = time.perf_counter() - start
  return compiled.memory_analysis().temp_size_in_bytes / 2**20, seconds


def main() -> None:
  device = tpu_compile.topology_devices("v5e:2x2")[0]
  rows = []
  for name, attention in (("full", _full), ("hierarchical", _hierarchical)):
    for with_segments in (False, True):
      temp, seconds = measure(attention, with_segments, device)
      print(f"{name} segment_ids={with_segments}: temp {temp:.1f} MiB, compiled in "
            f"{seconds:.1f} s", flush=True)
      rows.append([name, "yes" if with_segments else "no", f"{temp:.1f}", f"{seconds:.0f}"])
  common.write_report(
      os.path.join(common.RESULTS_DIR, "tpu_attention_memory.md"),
      "One attention layer's temporaries on a TPU v5e chip",
      [f"Forward + backward of one layer, {BATCH} x {LENGTH} rows, {HEADS} heads x "
       f"{HEAD_DIM}, bfloat16, compiled for {device.device_kind} by libtpu on this CPU.", "",
       common.markdown_table(["attention", "segment_ids", "temp MiB", "compile s"], rows)])


if __name__ == "__main__":
  main()
