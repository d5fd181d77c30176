"""Speed and memory of hierarchical attention against dense attention, and decoding cost.

In one run: forward and forward+backward (gradient of the sum of the outputs w.r.t. query,
key and value) wall time, peak memory and page faults for batch 4, 1 head, head_dim 64,
block 16, float32, for `hierarchical_attention` ("sample" and "fine" queries, causal; and its
finest level alone, `num_levels=1`) and `jax.nn.dot_product_attention(is_causal=True)`; then
the time of one decoding step at positions 1k, 4k and 16k (time per token of a jitted loop of
consecutive steps), `decode_step` against a full-attention KV-cache step.

Peak memory is the compiled executable's memory analysis: temp + argument + output bytes
(XLA's static buffer assignment, not a measured resident size).

  python -m benchmarks.attention [--quick] [--only decode|segments|bias] [--flaxformer PATH]

The cost of `segment_ids` (packed rows) is measured by `benchmarks.attention_segments`, that of
the relative position bias by `benchmarks.attention_bias`, each into its own results file;
`--only segments` / `--only bias` runs one alone. --flaxformer PATH (a local
google/flaxformer checkout) runs only the side-by-side comparison with the official
implementation (benchmarks/attention_peer.py) and writes its own results file.
"""

import argparse
import dataclasses
import functools
import os
import resource

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from benchmarks import attention_bias, attention_peer, attention_segments, common  # noqa: E402
from hattention import (decode_step, hierarchical_attention, init_cache,  # noqa: E402
                        kv_cache_step)

BATCH, HEADS, HEAD_DIM, BLOCK = 4, 1, 64, 16
DENSE_LIMIT_BYTES = 2 * 2**30  # skip dense attention whose logits alone exceed this
METHODS = {
    "hierarchical sample": functools.partial(hierarchical_attention, block_size=BLOCK,
                                             query_mode="sample"),
    "hierarchical fine": functools.partial(hierarchical_attention, block_size=BLOCK,
                                           query_mode="fine"),
    # The finest level alone (each query block against itself and the block before,
    # exact): what "sample" costs without its coarse levels.
    "block-local (num_levels=1)": functools.partial(hierarchical_attention, block_size=BLOCK,
                                                    num_levels=1),
    "dense": functools.partial(jax.nn.dot_product_attention, is_causal=True),
}


@dataclasses.dataclass
class Measurement:
  """Median wall ms, peak MiB and minor page faults per call of one (method, length, pass)."""
  ms: float
  mib: float
  faults: float


def _inputs(length: int):
  """query, key, value: [BATCH, length, HEADS, HEAD_DIM] float32."""
  keys = jax.random.split(jax.random.PRNGKey(length), 3)
  return tuple(jax.random.normal(k, (BATCH, length, HEADS, HEAD_DIM)) for k in keys)


def _measure(fn, args, repeats: int) -> Measurement:
  """Compiles fn once, reads its memory analysis and times it (median of repeats)."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes)
  call = lambda: compiled(*args)
  seconds = common.time_call(call, repeats=repeats)
  return Measurement(1e3 * seconds, peak / 2**20, _page_faults(call))


def _page_faults(call, calls: int = 3) -> float:
  """Minor page faults of this process per call (fresh memory being mapped).

  Temporaries above glibc's 32 MiB mmap threshold are mapped anew at every call, and
  each 4 KiB page then faults on first touch.
  """
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    jax.block_until_ready(call())
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def measure_attention(lengths, repeats: int) -> dict:
  """{(method, length, pass): Measurement or None (skipped)}."""
  results = {}
  for length in lengths:
    args = _inputs(length)
    for method, attention in METHODS.items():
      too_big = method == "dense" and BATCH * HEADS * length**2 * 4 > DENSE_LIMIT_BYTES
      for name, fn in common.forward_and_backward(attention).items():
        key = (method, length, name)
        results[key] = None if too_big else _measure(fn, args, repeats)
        print(key, results[key] or "skipped", flush=True)
  return results


def _naive_full_attention_step(k_cache, v_cache, query, key, value, position):
  """A full-attention step on a [batch, max_len, heads, dim] cache (dot_product_attention).

  XLA on CPU copies the whole cache at every step; `kv_cache_step`'s [batch * heads,
  max_len, dim] layout avoids the copy.
  """
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, key, position, axis=1)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, value, position, axis=1)
  mask = jnp.arange(k_cache.shape[1]) <= position
  out = jax.nn.dot_product_attention(query, k_cache, v_cache, mask=mask[None, None, None])
  return out, k_cache, v_cache


def _step_inputs(steps: int):
  """query, key, value: [steps, BATCH, 1, HEADS, HEAD_DIM] float32, one set per step."""
  return tuple(x.swapaxes(0, 1)[:, :, None] for x in _inputs(steps))


def _hierarchical_steps(cache, inputs):
  """Runs decode_step once per leading index of inputs (a fori_loop, as in sampling).

  Returns (sum of the outputs [BATCH, 1, HEADS, HEAD_DIM], final cache).
  """
  def body(i, carry):
    cache, total = carry
    out, cache = decode_step(cache, *(x[i] for x in inputs))
    return cache, total + out

  total = jnp.zeros(inputs[0].shape[1:])
  cache, total = jax.lax.fori_loop(0, inputs[0].shape[0], body, (cache, total))
  return total, cache


def _full_attention_steps(step, k_cache, v_cache, position, inputs):
  """`step` (a KV-cache step) at position, position + 1, ... (a fori_loop).

  Returns (sum of the outputs [BATCH, 1, HEADS, HEAD_DIM], k_cache, v_cache).
  """
  def body(i, carry):
    k_cache, v_cache, total = carry
    out, k_cache, v_cache = step(k_cache, v_cache, *(x[i] for x in inputs), position + i)
    return k_cache, v_cache, total + out

  total = jnp.zeros(inputs[0].shape[1:])
  k_cache, v_cache, total = jax.lax.fori_loop(0, inputs[0].shape[0], body,
                                              (k_cache, v_cache, total))
  return total, k_cache, v_cache


def _filled_cache(position: int, max_length: int):
  """A "sample" HierarchicalCache after decoding `position` random tokens (jitted loop)."""
  cache = init_cache(BATCH, max_length, HEADS, HEAD_DIM, block_size=BLOCK)
  fill = jax.jit(lambda c, xs: jax.lax.fori_loop(
      0, position, lambda i, c: decode_step(c, *(x[i % x.shape[0]] for x in xs))[1], c))
  return jax.block_until_ready(fill(cache, _step_inputs(256)))


def _bytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


KV_SHAPES = {  # method: (step, cache shape for a max_length)
    "full-attention KV cache": (kv_cache_step, lambda n: (BATCH * HEADS, n, HEAD_DIM)),
    "naive KV cache": (_naive_full_attention_step, lambda n: (BATCH, n, HEADS, HEAD_DIM)),
}


def _time_per_token(call, repeats: int, steps: int) -> float:
  return 1e3 * common.time_call(call, repeats=repeats, warmup=2) / steps


def measure_decoding(positions, repeats: int, steps: int = 64) -> dict:
  """{(method, position): (ms per token, cache MiB)}.

  Each timed call is one jitted fori_loop of `steps` consecutive decoding steps starting
  at `position` (max_length position + steps), its state donated and reused so that the
  caches are updated in place; the time is the median call divided by `steps`. The
  hierarchical cache is filled by actually decoding `position` tokens; the KV caches (whose
  step cost does not depend on their contents) hold random keys and values.
  """
  inputs = _step_inputs(steps)
  hier = jax.jit(_hierarchical_steps, donate_argnums=0)
  results = {}
  for position in positions:
    max_length = position + steps
    state = {"cache": _filled_cache(position, max_length)}

    def hier_call():  # restart at `position`: the ring buffers are just overwritten
      total, cache = hier(state["cache"], inputs)
      state["cache"] = dataclasses.replace(cache, position=jnp.int32(position))
      return total

    ms = _time_per_token(hier_call, repeats, steps)
    results[("hierarchical decode_step", position)] = (ms, _bytes(state["cache"]) / 2**20)
    print("hierarchical decode_step", position, f"{ms:.4f} ms per token", flush=True)
    for method, (step, shape) in KV_SHAPES.items():
      loop = jax.jit(functools.partial(_full_attention_steps, step), donate_argnums=(0, 1))
      state["kv"] = [jax.random.normal(jax.random.PRNGKey(i), shape(max_length))
                     for i in range(2)]

      def full_call():
        total, *state["kv"] = loop(*state["kv"], jnp.int32(position), inputs)
        return total

      ms = _time_per_token(full_call, repeats, steps)
      results[(method, position)] = (ms, _bytes(state["kv"]) / 2**20)
      print(method, position, f"{ms:.4f} ms per token", flush=True)
  return results


def _fmt(m: Measurement | None, field: str, digits: int = 1) -> str:
  if m is None:
    return "skipped (> 2 GiB logits)"
  return f"{getattr(m, field):.{digits}f}"


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.2f}x"


def attention_tables(results, lengths) -> list[str]:
  """Markdown: per length and method time and memory, ratios to dense, growth 4k -> 16k."""
  rows = []
  for length in lengths:
    for method in METHODS:
      fwd, both = results[(method, length, "fwd")], results[(method, length, "fwd+bwd")]
      dense = results[("dense", length, "fwd+bwd")]
      speedup = "" if both is None or dense is None else _ratio(dense.ms, both.ms)
      mem = "" if both is None or dense is None else _ratio(both.mib, dense.mib)
      rows.append([length, method, _fmt(fwd, "ms"), _fmt(both, "ms"), _fmt(fwd, "mib"),
                   _fmt(both, "mib"), _fmt(fwd, "faults", 0), speedup, mem])
  sections = ["## Forward and forward+backward", "", common.markdown_table(
      ["length", "method", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB",
       "fwd page faults / call", "dense / this fwd+bwd time", "this / dense fwd+bwd memory"],
      rows), ""]
  if 4096 in lengths and 16384 in lengths:
    growth = []
    for method in METHODS:
      a, b = (results[(method, n, "fwd+bwd")] for n in (4096, 16384))
      fa, fb = (results[(method, n, "fwd")] for n in (4096, 16384))
      if None not in (a, b):
        growth.append([method, _ratio(fb.ms, fa.ms), _ratio(b.ms, a.ms),
                       _ratio(fb.mib, fa.mib), _ratio(b.mib, a.mib)])
    sections += ["## Growth from 4096 to 16384 (linear = 4x)", "", common.markdown_table(
        ["method", "fwd time", "fwd+bwd time", "fwd memory", "fwd+bwd memory"], growth), ""]
  return sections


def decoding_table(results, positions, steps: int = 64) -> list[str]:
  """Markdown: per position the time per token and cache size of the decoders."""
  rows = []
  for position in positions:
    hier, hier_mib = results[("hierarchical decode_step", position)]
    full, full_mib = results[("full-attention KV cache", position)]
    naive, _ = results[("naive KV cache", position)]
    rows.append([position, f"{hier:.4f}", f"{full:.4f}", _ratio(full, hier), f"{naive:.4f}",
                 f"{hier_mib:.2f}", f"{full_mib:.1f}"])
  return ["## Decoding: time per token at a given position", "",
          f"Batch {BATCH}, {HEADS} head, head_dim {HEAD_DIM}, block {BLOCK}, float32, "
          f"max_length position + {steps}. Each timed call is one jitted `lax.fori_loop` of "
          f"{steps} consecutive steps from a cache already filled up to the position (the "
          "hierarchical \"sample\" cache by decoding that many tokens), its state donated and "
          f"updated in place; time per token = median call / {steps}. The full-attention "
          "step (`hattention.kv_cache_step`, also the full-attention model's decoding step) "
          "writes the new key/value into a [batch * heads, max_length, dim] cache with "
          "`dynamic_update_slice` and attends over it with a length mask (two batched "
          "matrix-vector products, no copy of the cache). The naive column is the same step "
          "on a [batch, max_length, heads, dim] cache with `jax.nn.dot_product_attention`, "
          "for which XLA on CPU copies the cache at every step. The hierarchical cache holds "
          "ring buffers of 2 * block slots per level.", "",
          common.markdown_table(["position", "hierarchical decode_step ms/token",
                                 "full-attention KV-cache ms/token", "full / hierarchical",
                                 "naive KV-cache ms/token", "hierarchical cache MiB",
                                 "KV cache MiB"], rows), ""]


def plot(results, lengths, path: str) -> None:
  """Log-log time (fwd, fwd+bwd) and fwd+bwd peak memory against length."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  panels = [("fwd", "ms", "forward time (ms)"), ("fwd+bwd", "ms", "forward+backward time (ms)"),
            ("fwd+bwd", "mib", "forward+backward peak memory (MiB)")]
  for axis, (name, field, title) in zip(axes, panels):
    for method in METHODS:
      points = [(n, getattr(results[(method, n, name)], field)) for n in lengths
                if results[(method, n, name)] is not None]
      if points:
        axis.plot(*zip(*points), marker="o", label=method)
    axis.set(xscale="log", yscale="log", xlabel="sequence length", title=title)
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="lengths 1k and 4k only, fewer repeats (smoke test)")
  parser.add_argument("--only", choices=["decode", "segments", "bias"],
                      help="run only this part: decode prints its table (no results file), "
                      "segments writes results/attention_segments.md, bias "
                      "results/attention_bias.md")
  parser.add_argument("--flaxformer", metavar="PATH",
                      help="a google/flaxformer checkout: time its hierarchical attention side "
                      "by side with ours (only that; see benchmarks/attention_peer.py)")
  args = parser.parse_args()
  lengths = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
  positions = [1024, 4096] if args.quick else [1024, 4096, 16384]
  repeats = 2 if args.quick else 7
  if args.flaxformer:
    attention_peer.run(args.flaxformer, ours=METHODS["hierarchical sample"], make_inputs=_inputs,
                       passes=common.forward_and_backward, block_size=BLOCK, lengths=lengths,
                       rounds=repeats,
                       shape_note=f"Batch {BATCH}, {HEADS} head, head_dim {HEAD_DIM}, block "
                       f"{BLOCK}, float32, causal.")
    return
  decode_repeats = 5 if args.quick else 20
  if args.only == "decode":
    print("\n".join(decoding_table(measure_decoding(positions, decode_repeats), positions)))
    return
  if args.only == "segments":
    attention_segments.run()
    return
  if args.only == "bias":
    attention_bias.run()
    return
  results = measure_attention(lengths, repeats)
  decoding = measure_decoding(positions, repeats=decode_repeats)
  note = (f"Batch {BATCH}, {HEADS} head, head_dim {HEAD_DIM}, block {BLOCK}, float32, causal. "
          f"Times: median of {repeats} calls after a warm-up call. Peak memory: "
          "`jax.jit(f).lower(...).compile().memory_analysis()`, temp + argument + output "
          "bytes. fwd+bwd is the gradient of the sum of the outputs w.r.t. query, key and "
          "value. Dense is `jax.nn.dot_product_attention(is_causal=True)`. Page faults: "
          "minor page faults of the process per forward call (mean of 3 calls after the "
          "timed ones); temporaries above glibc's 32 MiB mmap threshold are mapped afresh, "
          "and fault page by page, at every call.")
  png = os.path.join(common.RESULTS_DIR, "attention.png")
  os.makedirs(common.RESULTS_DIR, exist_ok=True)
  plot(results, lengths, png)
  sections = ([note, ""] + attention_tables(results, lengths)
              + decoding_table(decoding, positions) + ["![timings](attention.png)"])
  common.write_report(os.path.join(common.RESULTS_DIR, "attention.md"),
                      "Hierarchical attention: speed and memory", sections)
  if not args.quick:
    attention_segments.run()
    attention_bias.run()

if __name__ == "__main__":
  main()
