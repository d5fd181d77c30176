"""What the hierarchical relative position bias costs: hierarchical attention with a
`relative_bias` table against the same call without.

One row of the 53M model's attention (batch 1, 8 heads, head_dim 64, block 16, float32, causal),
"sample" and "fine" queries, at 4k and 16k positions, with the paper's table (one for every
level, [63, 8]) and with one table per level ([levels, 63, 8]). Forward, and forward+backward
with gradients for query, key, value (and the table, when there is one). The calls of the two
versions are interleaved in one process and the ratio is that of their medians.

  python -m benchmarks.attention --only bias     (writes results/attention_bias.md)
"""

import functools
import itertools
import os

import jax

from benchmarks import attention_segments, common
from hattention import hierarchical_attention, level_count

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 8, 64, 16
TARGET = 1.15  # issue 24: within 1.15x of the time without the bias
QUERY_MODES = ("sample", "fine")


def _passes(attention, table):
  """{"fwd": outputs, "fwd+bwd": gradients of their sum} of attention(q, k, v, table)."""
  if table is None:
    return common.forward_and_backward(attention)
  loss = lambda q, k, v, t: attention(q, k, v, relative_bias=t).sum()
  return {"fwd": lambda q, k, v, t: attention(q, k, v, relative_bias=t),
          "fwd+bwd": jax.grad(loss, argnums=(0, 1, 2, 3))}


def measure(lengths, rounds: int) -> list[list]:
  """Table rows: length, query mode, table, pass, ms without / with, ratio."""
  rows = []
  for length, query_mode, per_level in itertools.product(lengths, QUERY_MODES, (False, True)):
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    qkv = tuple(jax.random.normal(k, (BATCH, length, HEADS, HEAD_DIM)) for k in keys[:3])
    shape = (4 * BLOCK - 1, HEADS)
    if per_level:
      shape = (level_count(length, BLOCK),) + shape
    table = 0.1 * jax.random.normal(keys[3], shape)
    attention = functools.partial(hierarchical_attention, block_size=BLOCK,
                                  query_mode=query_mode)
    for name in ("fwd", "fwd+bwd"):
      plain = _passes(attention, None)[name]
      with_table = _passes(attention, table)[name]
      without, with_bias = attention_segments.interleaved_medians(
          [lambda q, k, v, t: plain(q, k, v), with_table], qkv + (table,), rounds)
      rows.append([length, query_mode, f"{list(shape)}", name, f"{without:.1f}",
                   f"{with_bias:.1f}", f"{with_bias / without:.2f}x"])
      print(rows[-1], flush=True)
  return rows


def run(lengths=(4096, 16384), rounds: int = 11) -> None:
  """Measures and writes benchmarks/results/attention_bias.md."""
  rows = measure(lengths, rounds)
  note = (f"Batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, block {BLOCK}, float32, causal. "
          "Each pair of versions (without and with `relative_bias`, same inputs) compiled once, "
          f"then called alternately {rounds} times after a warm-up call; the times are the "
          f"medians and the ratio theirs (target: within {TARGET}x). fwd+bwd: gradients for "
          "query, key, value, and the table when there is one.")
  table = common.markdown_table(["length", "query mode", "table shape", "pass", "without ms",
                                 "with relative_bias ms", "with / without"], rows)
  common.write_report(os.path.join(common.RESULTS_DIR, "attention_bias.md"),
                      "Hierarchical attention: the cost of the relative position bias",
                      [note, "", table, ""])


if __name__ == "__main__":
  run()
