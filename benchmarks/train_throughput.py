"""Training throughput in real tokens per second, and MFU: packed vs sentence rows,
hierarchical vs full attention.

Times the pipeline's own jitted train step (`lm1b.steps.make_train_step`: forward, backward,
AdamW update) in one process, the configurations' steps interleaved (round robin), so that
machine noise hits them alike:

* rows: the 53M model (float32) at seq_len 256 on batches built by the pipeline
  (lm1b.batches.TrainBatches) from LM1B-like sentence lengths (benchmarks.packing), in sentence
  rows and in packed rows, for both attention kinds. Real tokens are targets with weight 1;
  fill = real tokens / slots. MFU is given on real tokens and on all slots.
* lengths: full rows of random tokens, hierarchical vs full attention at several sequence
  lengths with the tokens per step held fixed (the batch shrinks as the sequence grows).

The peak FLOP/s for MFU is measured once here (on CPU: a chained f32 matmul) and printed with
the gin binding that gives it to training (train_and_evaluate.peak_flops_per_device); on TPU/GPU
the device table of lm1b.flops is used.

  python -m benchmarks.train_throughput [--only rows|lengths] [--rows 8] [--repeats 5]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, packing
from lm1b import batches, experiment, flops, optim, partitioning, steps
from lm1b.model_config import ModelConfig

MODELS = {
    "tiny": dict(vocab_size=1024, num_layers=2, num_heads=4, d_model=128, d_ff=512,
                 block_size=8),
    "53m": dict(vocab_size=32768, num_layers=6, num_heads=8, d_model=512, d_ff=2048,
                block_size=16),
}


class Run:
  """One configuration's state, train step and batches, steppable one step at a time."""

  def __init__(self, config: ModelConfig, data: list[dict]):
    mesh = partitioning.make_mesh()
    schedule = optim.make_schedule(learning_rate=1e-4, warmup_steps=10, decay="rsqrt")
    spec = experiment.make_state_spec(config, optim.make_optimizer(1, schedule=schedule),
                                      mesh)
    self.config, self.step_fn = config, steps.make_train_step(spec, label_smoothing=0.0)
    self.state = experiment.init_state(spec, seed=0)
    self.data = [batches.to_global_arrays(b, partitioning.batch_sharding(mesh)) for b in data]
    self.real = [float(b["weights"].sum()) for b in data]
    self.slots = data[0]["weights"].size
    self.times: list[float] = []
    self.count = 0
    self.step()  # compile

  def step(self) -> float:
    """Runs one step on the next batch; returns its seconds."""
    batch = self.data[self.count % len(self.data)]
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, batch)
    jax.block_until_ready(metrics["loss_sum"])
    self.count += 1
    return time.perf_counter() - start

  def real_per_step(self) -> float:
    return float(np.mean(self.real))


def interleaved(runs: dict[str, Run], repeats: int) -> dict[str, float]:
  """Median step seconds per run, the runs stepping in turn."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      times[name].append(run.step())
  return {name: statistics.median(t) for name, t in times.items()}


def peak(dtype: str) -> tuple[float, str]:
  if jax.default_backend() == "cpu":
    return flops.measure_cpu_matmul_peak(jnp.dtype(dtype)), "f32 matmul measured in this run"
  devices = jax.devices()
  return sum(flops.peak_flops(d.device_kind, dtype) or 0 for d in devices), "device table"


def rows_section(args, peak_flops: float) -> list[str]:
  """Packed vs sentence rows on LM1B-like lengths (53M, seq 256)."""
  seq_len, split = 256, packing.lm1b_like_split(20000, seed=1)
  runs = {}
  for attention in ("hierarchical", "full"):
    config = ModelConfig(**MODELS["53m"], attention=attention, max_len=seq_len,
                         dropout_rate=0.0, dtype=args.dtype)
    for mode in ("sentence", "packed"):
      it = batches.TrainBatches(split, global_batch=args.rows, seq_len=seq_len, mode=mode,
                                seed=0, slot=experiment.packing_slot_for(config))
      runs[(attention, mode)] = Run(config, [next(it) for _ in range(4)])
      print(f"compiled {attention} {mode}", flush=True)
  seconds = interleaved(runs, args.repeats)
  rows, real_speed = [], {}
  for (attention, mode), run in runs.items():
    sec = seconds[(attention, mode)]
    per_token = flops.flops_per_token_for_config(run.config, seq_len)
    real_speed[(attention, mode)] = run.real_per_step() / sec
    rows.append([attention, mode, f"{run.real_per_step() / run.slots:.1%}", f"{sec * 1e3:.0f}",
                 f"{real_speed[(attention, mode)]:,.0f}", f"{run.slots / sec:,.0f}",
                 f"{real_speed[(attention, mode)] * per_token / peak_flops:.1%}",
                 f"{run.slots / sec * per_token / peak_flops:.1%}"])
  ratios = [
      f"packed / sentence real tokens/s: hierarchical "
      f"{real_speed[('hierarchical', 'packed')] / real_speed[('hierarchical', 'sentence')]:.2f}x,"
      f" full {real_speed[('full', 'packed')] / real_speed[('full', 'sentence')]:.2f}x; "
      f"hierarchical / full on packed rows "
      f"{real_speed[('hierarchical', 'packed')] / real_speed[('full', 'packed')]:.2f}x"]
  return [f"## Packed vs sentence rows (53M, seq_len 256, {args.rows} rows per step, "
          "LM1B-like lengths)", "",
          common.markdown_table(["attention", "rows", "fill", "step ms", "real tokens/s",
                                 "slots/s", "MFU (real tokens)", "MFU (all slots)"], rows),
          "", *ratios, ""]


def random_batch(batch: int, seq_len: int, vocab: int) -> dict:
  """A full (no padding) batch of random tokens in the layout of lm1b.batches."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "weights": np.ones((batch, seq_len), np.float32)}


def lengths_section(args, peak_flops: float) -> list[str]:
  """Hierarchical vs full attention on full rows at several sequence lengths."""
  rows = []
  for name in args.models:
    for seq_len in args.seq_lens:
      batch = max(args.tokens_per_step // seq_len, 1)
      runs = {}
      for attention in ("hierarchical", "full"):
        config = ModelConfig(**MODELS[name], attention=attention, max_len=seq_len,
                             dropout_rate=0.0, dtype=args.dtype)
        runs[attention] = Run(config, [random_batch(batch, seq_len, config.vocab_size)])
      seconds = interleaved(runs, args.repeats)
      for attention, run in runs.items():
        per_token = flops.flops_per_token_for_config(run.config, seq_len)
        speed = run.slots / seconds[attention]
        rows.append([name, seq_len, batch, attention, f"{seconds[attention] * 1e3:.0f}",
                     f"{speed:,.0f}", f"{per_token / 1e6:.1f}",
                     f"{speed * per_token / peak_flops:.1%}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
      rows[-1].append(f"{seconds['full'] / seconds['hierarchical']:.2f}x")
      rows[-2].append("")
  return [f"## Hierarchical vs full attention on full rows ({args.tokens_per_step} tokens per "
          "step)", "",
          common.markdown_table(["model", "seq_len", "batch", "attention", "step ms",
                                 "tokens/s", "MFLOPs/token", "MFU", "hier/full speed"], rows),
          ""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=("rows", "lengths"), default=None)
  parser.add_argument("--rows", type=int, default=8, help="rows per step (rows section)")
  parser.add_argument("--models", nargs="+", default=["tiny", "53m"], choices=sorted(MODELS))
  parser.add_argument("--seq_lens", type=int, nargs="+", default=[128, 512, 2048])
  parser.add_argument("--tokens_per_step", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", help="compute dtype (float32 on CPU)")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "train_throughput.md"))
  args = parser.parse_args()

  peak_flops, source = peak(args.dtype)
  devices = len(jax.devices())
  binding = f"train_and_evaluate.peak_flops_per_device = {peak_flops / devices:.3g}"
  print(f"peak {peak_flops:.3g} FLOP/s ({source}); for training: --gin_param '{binding}'",
        flush=True)
  sections = [f"Peak: {peak_flops:.3g} FLOP/s ({source}); give it to training with "
              f"`--gin_param '{binding}'`. Compute dtype {args.dtype}, dropout off, AdamW "
              "update included; median of the interleaved steps. Model FLOPs count 6 x "
              "matmul parameters plus the attention actually computed (full: the whole "
              "L x L; hierarchical: about 3 blocks per level).", ""]
  if args.only in (None, "rows"):
    sections += rows_section(args, peak_flops)
  if args.only in (None, "lengths"):
    sections += lengths_section(args, peak_flops)
  common.write_report(args.out, "Training throughput and MFU", sections)


if __name__ == "__main__":
  main()
