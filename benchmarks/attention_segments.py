"""What segment_ids cost: hierarchical attention on packed rows against the same rows unpacked.

For batch 4, 1 head, head_dim 64, block 16, float32, causal, "sample" and "fine" queries (the
shape of `benchmarks.attention`), the forward and forward+backward time of `hierarchical_attention`
with `segment_ids` over the time without, at 4k and 16k positions, for two layouts laid out
with `hattention.packing_slot` (first fit): sentences of LM1B-like lengths (about 29 tokens
on average) over the whole row, and a few long segments. The calls of the two versions are
interleaved in one process and the ratio is that of their medians.

  python -m benchmarks.attention --only segments     (writes results/attention_segments.md)
"""

import functools
import itertools
import os
import statistics

import jax
import numpy as np

from benchmarks import common
from hattention import hierarchical_attention, packing_slot

BATCH, HEADS, HEAD_DIM, BLOCK = 4, 1, 64, 16
TARGET = 1.3  # issue 12: within 1.3x of the time without segments
QUERY_MODES = ("sample", "fine")


def _first_fit(lengths, row: int) -> np.ndarray:
  """[row] int32 segment ids: each length at the first offset packing_slot allows after the
  previous segment's footprint (lengths that no longer fit are skipped)."""
  segment_ids, cursor = np.zeros(row, np.int32), 0
  for n in lengths:
    slot = packing_slot(int(n), BLOCK)
    offset = slot.first_offset(cursor)
    if offset + n <= row:
      segment_ids[offset:offset + n] = segment_ids.max() + 1
      cursor = offset + slot.span
  return segment_ids


def sentence_lengths(rng, count: int) -> np.ndarray:
  """LM1B-like sentence lengths in tokens: log-normal, median 25, mean about 29, 2..256."""
  return np.clip(np.round(rng.lognormal(np.log(25), 0.55, count)), 2, 256).astype(int)


LAYOUTS = {  # name: (description, lengths for one row of `row` positions)
    "sentences": ("LM1B-like sentences (median 25 tokens) over the whole row",
                  lambda rng, row: sentence_lengths(rng, row // 8)),
    "few long": ("4 long segments of 15-24% of the row each",
                 lambda rng, row: (rng.uniform(0.15, 0.24, 4) * row).astype(int)),
}


def segment_ids(layout: str, length: int) -> np.ndarray:
  """[BATCH, length] int32 segment ids of `layout`, a different draw per row."""
  rng = np.random.default_rng(length)
  return np.stack([_first_fit(LAYOUTS[layout][1](rng, length), length) for _ in range(BATCH)])


def interleaved_medians(fns, args, rounds: int) -> list[float]:
  """Median wall ms of each compiled fn, their calls interleaved (after one warm-up each)."""
  compiled = [jax.jit(fn).lower(*args).compile() for fn in fns]
  for call in compiled:
    jax.block_until_ready(call(*args))
  times = common.interleaved_ms([functools.partial(call, *args) for call in compiled], rounds)
  return [statistics.median(t) for t in times]


def measure(lengths, rounds: int) -> list[list]:
  """Table rows: length, query mode, layout, segments per row, fill, pass, ms without / with,
  ratio."""
  rows = []
  for length, query_mode, layout in itertools.product(lengths, QUERY_MODES, LAYOUTS):
    keys = jax.random.split(jax.random.PRNGKey(length), 3)
    args = tuple(jax.random.normal(k, (BATCH, length, HEADS, HEAD_DIM)) for k in keys)
    ids = segment_ids(layout, length)
    plain = functools.partial(hierarchical_attention, block_size=BLOCK, query_mode=query_mode)
    packed = functools.partial(plain, segment_ids=ids)
    for name in ("fwd", "fwd+bwd"):
      without, with_segments = interleaved_medians(
          [common.forward_and_backward(f)[name] for f in (plain, packed)], args, rounds)
      rows.append([length, query_mode, layout, f"{ids.max(1).mean():.0f}",
                   f"{(ids > 0).mean():.0%}", name, f"{without:.1f}", f"{with_segments:.1f}",
                   f"{with_segments / without:.2f}x"])
      print(rows[-1], flush=True)
  return rows


def run(lengths=(4096, 16384), rounds: int = 15) -> None:
  """Measures and writes benchmarks/results/attention_segments.md."""
  rows = measure(lengths, rounds)
  layouts = "; ".join(f"{name}: {description}" for name, (description, _) in LAYOUTS.items())
  note = (f"Batch {BATCH}, {HEADS} head, head_dim {HEAD_DIM}, block {BLOCK}, float32, causal. "
          "Each pair of versions (without and with `segment_ids`, same "
          f"inputs) compiled once, then called alternately {rounds} times after a warm-up "
          "call; the times are the medians and the ratio theirs (target: within "
          f"{TARGET}x). Layouts, placed with `hattention.packing_slot` (first fit, each "
          f"batch row drawn afresh): {layouts}. Fill: positions inside a segment.")
  table = common.markdown_table(["length", "query mode", "layout", "segments / row", "fill",
                                 "pass", "without ms", "with segment_ids ms", "with / without"],
                                rows)
  common.write_report(os.path.join(common.RESULTS_DIR, "attention_segments.md"),
                      "Hierarchical attention: the cost of segment_ids", [note, "", table, ""])
