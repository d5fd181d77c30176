"""Does the training loop wait for batch building? Batches built in the loop vs prefetched.

The training loop (lm1b.train.Trainer) builds the next batches in a background thread
(lm1b.prefetch.Prefetcher: plan, build and place host rows as global device arrays) while
the current step runs. This measures, for a small model (1 layer, d_model 64, float32) on
packed rows of LM1B-like lengths (benchmarks.packing), per iteration of a training loop:
the wall time, and the time the loop spends getting its next batch (building it, or waiting
for the prefetch thread), in two kinds of loop: one that blocks on every step's result
(as any per-step host check does) and one that only dispatches (JAX runs steps
asynchronously, so building the next batch on the main thread overlaps the running step).
Building a batch and running a step are also timed alone. On a CPU backend the step and the
builder share the same cores; on an accelerator the host builds while the device computes.

  python -m benchmarks.prefetch [--rows 128] [--seq_len 256] [--steps 20] [--repeats 3]
"""

import argparse
import os
import statistics
import time

import jax

from benchmarks import common, packing
from lm1b import batches, experiment, optim, partitioning, steps
from lm1b.model_config import ModelConfig
from lm1b.prefetch import Prefetcher


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=128)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "prefetch.md"))
  args = parser.parse_args()

  config = ModelConfig(vocab_size=1024, num_layers=1, num_heads=2, d_model=64, d_ff=128,
                       block_size=16, max_len=args.seq_len, dropout_rate=0.0, dtype="float32")
  mesh = partitioning.make_mesh()
  sharding = partitioning.batch_sharding(mesh)
  spec = experiment.make_state_spec(config, optim.make_optimizer(1, schedule=1e-4), mesh)
  train_step = steps.make_train_step(spec, label_smoothing=0.0)
  state = [experiment.init_state(spec, seed=0)]
  rows = batches.TrainBatches(packing.lm1b_like_split(50000, seed=2), global_batch=args.rows,
                              seq_len=args.seq_len, mode="packed",
                              slot=experiment.packing_slot_for(config))

  def build():
    return batches.to_global_arrays(next(rows), sharding)

  def step(batch):
    state[0], metrics = train_step(state[0], batch)
    return metrics["loss_sum"]

  def per_iteration(batch_source, block_each_step: bool) -> tuple[float, float]:
    """(wall seconds per iteration, seconds per iteration spent getting the next batch)."""
    jax.block_until_ready(step(next(batch_source)))  # warm-up
    waited, start = 0.0, time.perf_counter()
    for _ in range(args.steps):
      fetch = time.perf_counter()
      batch = next(batch_source)
      waited += time.perf_counter() - fetch
      loss = step(batch)
      if block_each_step:
        jax.block_until_ready(loss)
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / args.steps, waited / args.steps

  def forever():
    while True:
      yield build()

  placed = build()
  build_s = common.time_call(lambda: build()["inputs"], repeats=args.steps)
  step_s = common.time_call(lambda: step(placed), repeats=args.steps)
  rows_out = []
  for block_each_step in (True, False):
    runs = {"synchronous": [], "prefetched": []}
    for _ in range(args.repeats):
      runs["synchronous"].append(per_iteration(forever(), block_each_step))
      with Prefetcher(forever()) as source:
        runs["prefetched"].append(per_iteration(source, block_each_step))
    for name, values in runs.items():
      wall = statistics.median(v[0] for v in values)
      waited = statistics.median(v[1] for v in values)
      rows_out.append(["blocks on every step" if block_each_step else "asynchronous dispatch",
                       name, f"{1e3 * wall:.1f}", f"{1e3 * waited:.2f}"])
  table = common.markdown_table(
      ["loop", "batches", "ms per iteration", "ms per iteration waiting for the batch"],
      rows_out)
  note = (f"Alone: building and placing one batch {1e3 * build_s:.1f} ms, one step "
          f"{1e3 * step_s:.1f} ms (medians).")
  print(note + "\n" + table, flush=True)
  common.write_report(args.out, "Batch building overlapped with the train step", [
      f"1 layer, d_model 64 (float32), packed rows of LM1B-like lengths, {args.rows} x "
      f"{args.seq_len} per batch; {args.steps} iterations per loop, median of {args.repeats} "
      "alternating runs. A loop that blocks on every step is one that reads a step's result "
      "at once (e.g. a host-side check per step); with asynchronous dispatch the next step is "
      "queued while the current one runs.", "", note, "", table])


if __name__ == "__main__":
  main()
