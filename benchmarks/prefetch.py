"""Does the training step still wait for batch building? Step time with and without prefetch.

The training loop (lm1b.train.Trainer) builds the next batches in a background thread
(lm1b.prefetch.Prefetcher: host rows -> global device arrays) while the current step runs.
This measures, for the tiny model on packed rows of LM1B-like lengths (benchmarks.packing):

  build        seconds to plan, build and put on the devices one batch, alone
  step         seconds of one train step on an already placed batch, alone
  synchronous  seconds per iteration of a loop that builds a batch, then runs the step
  prefetched   seconds per iteration of the loop the trainer runs (Prefetcher)

With prefetching an iteration costs about max(step, build) instead of step + build.
Each loop runs `--steps` iterations after one warm-up; the two loops alternate `--repeats`
times and the medians are reported.

  python -m benchmarks.prefetch [--rows 32] [--seq_len 256] [--steps 20] [--repeats 3]
"""

import argparse
import os
import statistics
import time

import jax

from benchmarks import common, packing
from benchmarks.train_throughput import MODELS
from lm1b import batches, experiment, optim, partitioning, steps
from lm1b.model import ModelConfig
from lm1b.prefetch import Prefetcher


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "prefetch.md"))
  args = parser.parse_args()

  config = ModelConfig(**MODELS["tiny"], max_len=args.seq_len, dropout_rate=0.0,
                       dtype="float32")
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

  def per_iteration(batch_source) -> float:
    jax.block_until_ready(step(next(batch_source)))  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
      loss = step(next(batch_source))
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / args.steps

  def forever():
    while True:
      yield build()

  placed = build()
  build_s = common.time_call(lambda: build()["inputs"], repeats=args.steps)
  step_s = common.time_call(lambda: step(placed), repeats=args.steps)
  synchronous, prefetched = [], []
  for _ in range(args.repeats):
    synchronous.append(per_iteration(forever()))
    with Prefetcher(forever()) as source:
      prefetched.append(per_iteration(source))
  sync_s, pre_s = statistics.median(synchronous), statistics.median(prefetched)
  table = common.markdown_table(
      ["build ms", "step ms", "synchronous ms/iteration", "prefetched ms/iteration",
       "prefetched / (build + step)", "prefetched / max(build, step)"],
      [[f"{1e3 * build_s:.1f}", f"{1e3 * step_s:.1f}", f"{1e3 * sync_s:.1f}",
        f"{1e3 * pre_s:.1f}", f"{pre_s / (build_s + step_s):.2f}",
        f"{pre_s / max(build_s, step_s):.2f}"]])
  print(table, flush=True)
  common.write_report(args.out, "Batch building overlapped with the train step", [
      f"Tiny model (float32), packed rows of LM1B-like lengths, {args.rows} x {args.seq_len} "
      f"per batch; {args.steps} iterations per loop, median of {args.repeats} alternating "
      "runs.", "", table])


if __name__ == "__main__":
  main()
