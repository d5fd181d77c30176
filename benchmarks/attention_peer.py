"""Side by side with the official H-Transformer-1D attention (google/flaxformer), in one process.

`python -m benchmarks.attention --flaxformer PATH` (PATH: a local checkout of google/flaxformer,
used only while this benchmark runs; it is never installed, copied or imported elsewhere) times
the official causal one-dimensional hierarchical attention against `hierarchical_attention`
(query_mode "sample") in one interleaved loop, after checking that both give the same output
and gradients on the same inputs.

The official code is `OneDimDecoderSelfAttention._hierarchical_attention_fn` (the attention
between the multi-head projections) called on raw query, key and value; the query is divided by
sqrt(head_dim) first, as its `_multihead_projection` does with `rescale_logits=True`. Settings:
`num_clusters` = our block_size, `use_rpb=False` (no relative position bias: our function has
none), no padding mask, no dropout. Its causal decoder coarsens queries by sampling the first
position of each cell, keys by their mean and values by their sum, and weighs a cell by its size
(the "growth factor" of its softmax partition): the pair rule of our "sample" mode. The one
difference is the softmax stabiliser: it subtracts one offset per example and head (the maximum
logit over all blocks, stop-gradient) instead of a running maximum per row, and replaces a row's
partition below 1e-6 by 1; rows whose logits all lie about 14 below that maximum therefore come
out wrong (`stabiliser_check` measures it).

Importing it needs one shim: `flaxformer.components.dense` (the projections, which pull in the
`aqt` quantisation library) is replaced by an empty module before the import; nothing else is
patched.
"""

import dataclasses
import importlib
import os
import pathlib
import statistics
import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

from benchmarks import common
from hattention.reference import hierarchical_attention_reference

_H_ATTENTION = "flaxformer/architectures/h_transformer/h_attention.py"
_UNUSED_MODULE = "flaxformer.components.dense"  # projections only; needs `aqt`
AGREEMENT = 1e-4  # largest max abs difference of outputs or gradients accepted before timing


def load_official(path: str) -> types.ModuleType:
  """Imports flaxformer's h_attention module from the checkout at `path`."""
  root = pathlib.Path(path).expanduser().resolve()
  if not (root / _H_ATTENTION).is_file():
    raise SystemExit(f"--flaxformer {path}: not a google/flaxformer checkout "
                     f"({root / _H_ATTENTION} not found)")
  sys.modules.setdefault(_UNUSED_MODULE, types.ModuleType(_UNUSED_MODULE))
  sys.path.insert(0, str(root))
  return importlib.import_module("flaxformer.architectures.h_transformer.h_attention")


def official_attention(h_attention: types.ModuleType, block_size: int) -> Callable:
  """f(query, key, value) -> [batch, length, heads, head_dim]: the official causal attention.

  query, key, value: [batch, length, heads, head_dim] float32; length a multiple of block_size
  with a power-of-two number of blocks (>= 2).
  """
  def attention(query, key, value):
    heads, head_dim = query.shape[2:]
    module = h_attention.OneDimDecoderSelfAttention(
        num_heads=heads, num_clusters=block_size, use_rpb=False, dropout_rate=0.0,
        sharding_over_head_dimension=False)
    query = query / jnp.sqrt(head_dim).astype(query.dtype)  # its rescale_logits=True
    out = module.apply({}, query, key, value,
                       method=lambda m, q, k, v: m._hierarchical_attention_fn(q, k, v))
    return out.reshape(query.shape)

  return attention


@dataclasses.dataclass
class Pair:
  """One (length, pass): times of both in ms per round, peak MiB, output agreement."""
  ours_ms: list[float]
  theirs_ms: list[float]
  ours_mib: float
  theirs_mib: float
  max_abs_diff: float

  def ratios(self) -> list[float]:
    """Official time / ours, one per round."""
    return [t / o for o, t in zip(self.ours_ms, self.theirs_ms)]


def _compile(fn, args):
  """(compiled fn, peak MiB): temp + argument + output bytes of XLA's memory analysis."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes)
  return compiled, peak / 2**20


def _max_abs_diff(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))


def measure_pair(ours, theirs, args, rounds: int) -> Pair:
  """Compiles both, checks their outputs agree (AGREEMENT), then times them alternately.

  Each round calls both once, the order alternating between rounds, after one warm-up call of
  each; so both see the same machine load, and the ratio of a round is meaningful even when
  the absolute times drift.
  """
  (ours_c, ours_mib), (theirs_c, theirs_mib) = _compile(ours, args), _compile(theirs, args)
  diff = _max_abs_diff(ours_c(*args), theirs_c(*args))
  if diff > AGREEMENT:
    raise SystemExit(f"official and ours differ by {diff:.2e} > {AGREEMENT:g} at input shape "
                     f"{args[0].shape}: not the same attention")
  ours_ms, theirs_ms = common.interleaved_ms(
      [lambda: ours_c(*args), lambda: theirs_c(*args)], rounds)
  return Pair(ours_ms, theirs_ms, ours_mib, theirs_mib, diff)


def side_by_side(official, ours, make_inputs, passes, lengths, rounds: int) -> dict:
  """{(length, pass name): Pair}; `passes(f)` maps a pass name to a function of (q, k, v)."""
  results = {}
  for length in lengths:
    args = make_inputs(length)
    ours_passes, their_passes = passes(ours), passes(official)
    for name in ours_passes:
      pair = measure_pair(ours_passes[name], their_passes[name], args, rounds)
      results[(length, name)] = pair
      print(length, name, f"ratio median {statistics.median(pair.ratios()):.2f}",
            f"max |diff| {pair.max_abs_diff:.1e}", flush=True)
  return results


def stabiliser_check(official, ours, make_inputs, length: int, block_size: int) -> list[list]:
  """Rows: query scale, max |official - reference|, max |ours - reference|.

  The reference is the dense pair rule ("sample"). Scaling the query spreads the logits; the
  official global offset then underflows rows far below the maximum.
  """
  query, key, value = make_inputs(length)
  rows = []
  for scale in (1.0, 4.0, 16.0):
    args = (scale * query, key, value)
    reference = hierarchical_attention_reference(*args, block_size=block_size,
                                                 query_mode="sample")
    rows.append([f"{scale:g}", f"{_max_abs_diff(jax.jit(official)(*args), reference):.1e}",
                 f"{_max_abs_diff(jax.jit(ours)(*args), reference):.1e}"])
  return rows


def _spread(values) -> str:
  return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def report(results, stabiliser_rows, rounds: int, shape_note: str) -> list[str]:
  """Markdown sections of the side-by-side comparison."""
  rows = []
  for (length, name), pair in results.items():
    rows.append([length, name, f"{statistics.median(pair.ours_ms):.1f}",
                 f"{statistics.median(pair.theirs_ms):.1f}", _spread(pair.ratios()),
                 f"{pair.ours_mib:.1f}", f"{pair.theirs_mib:.1f}",
                 f"{pair.ours_mib / pair.theirs_mib:.2f}x", f"{pair.max_abs_diff:.1e}"])
  return [
      f"{shape_note} Ours: `hierarchical_attention(query_mode=\"sample\")`. Official: "
      "google/flaxformer `OneDimDecoderSelfAttention._hierarchical_attention_fn` on the same "
      "raw query, key and value (query divided by sqrt(head_dim) as its projection does; "
      "`num_clusters` = block, `use_rpb=False`, no padding mask, no dropout). Both jitted and "
      f"compiled once; then {rounds} rounds, each calling both once (order alternating), after "
      "a warm-up call of each. Ratio = official / ours per round (min / median / max). Peak "
      "memory: compiled memory analysis, temp + argument + output bytes. Max abs diff: the "
      "largest absolute difference of the outputs (fwd) or of the three gradients (fwd+bwd) on "
      "the same inputs.",
      "", "## Time, memory and agreement", "",
      common.markdown_table(
          ["length", "pass", "ours ms (median)", "official ms (median)",
           "official / ours time (min / median / max)", "ours peak MiB", "official peak MiB",
           "ours / official memory", "max abs diff"], rows), "",
      "## Softmax stabiliser", "",
      "The official code subtracts one offset per example and head (the largest logit of the "
      "whole sequence) and floors a row's partition at 1e-6; ours keeps a running maximum per "
      "row. On the benchmark's inputs both match the dense pair-rule reference (\"sample\"); "
      "with larger logits (query scaled) the official rows far below the global maximum lose "
      "their mass:", "",
      common.markdown_table(["query scale", "max abs(official - reference)",
                             "max abs(ours - reference)"], stabiliser_rows), ""]


def run(path: str, *, ours, make_inputs, passes, block_size: int, lengths, rounds: int,
        shape_note: str) -> str:
  """Loads the official code, measures, writes the results file; returns its path.

  The file is attention_flaxformer_<N>core(s).md, N the usable cores (taskset), so that a
  one-core run (`taskset -c 0`) does not overwrite the all-cores one.
  """
  official = official_attention(load_official(path), block_size)
  stabiliser = stabiliser_check(official, ours, make_inputs, 1024, block_size)
  results = side_by_side(official, ours, make_inputs, passes, lengths, rounds)
  cores = len(os.sched_getaffinity(0))
  output = os.path.join(common.RESULTS_DIR,
                        f"attention_flaxformer_{cores}core{'s' if cores > 1 else ''}.md")
  common.write_report(output, "Hierarchical attention against the official implementation",
                      report(results, stabiliser, rounds, shape_note))
  return output
