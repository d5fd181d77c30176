"""Training throughput and MFU: hierarchical vs full attention at several sequence lengths.

Times the pipeline's own jitted train step (`lm1b.train.make_train_step`: forward, backward,
AdamW update) on random tokens for the tiny and 53M models. MFU is model FLOPs per second
(`lm1b.flops`, with the attention actually computed) over a matmul peak measured in the same
run (on CPU) or the device table (TPU/GPU). Tokens per step are held fixed, so the batch
shrinks as the sequence grows.

  python -m benchmarks.train_throughput [--models tiny 53m] [--seq_lens 128 512 2048]
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lm1b import experiment, flops, optim, partitioning, steps
from lm1b.model import ModelConfig

MODELS = {
    "tiny": dict(vocab_size=1024, num_layers=2, num_heads=4, d_model=128, d_ff=512,
                 block_size=8),
    "53m": dict(vocab_size=32768, num_layers=6, num_heads=8, d_model=512, d_ff=2048,
                block_size=16),
}


def random_batch(batch: int, seq_len: int, vocab: int) -> dict:
  """A full (no padding) batch of random tokens in the layout of lm1b.batches."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "weights": np.ones((batch, seq_len), np.float32)}


def step_seconds(config: ModelConfig, batch: int, seq_len: int) -> float:
  """Median seconds of one train step of `config` on [batch, seq_len] tokens."""
  mesh = partitioning.make_mesh()
  schedule = optim.make_schedule(learning_rate=1e-4, warmup_steps=10, decay="rsqrt")
  spec = experiment.make_state_spec(config, optim.make_optimizer(1, schedule=schedule), mesh)
  step = steps.make_train_step(spec, label_smoothing=0.0)
  data = {k: jnp.asarray(v) for k, v in random_batch(batch, seq_len, config.vocab_size).items()}
  holder = [experiment.init_state(spec, seed=0)]

  def run():
    holder[0], metrics = step(holder[0], data)
    return metrics["loss_sum"]

  return common.time_call(run, repeats=3)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "53m"], choices=sorted(MODELS))
  parser.add_argument("--seq_lens", type=int, nargs="+", default=[128, 512, 2048])
  parser.add_argument("--tokens_per_step", type=int, default=4096)
  parser.add_argument("--dtype", default="float32", help="compute dtype (float32 on CPU)")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "train_throughput.md"))
  args = parser.parse_args()

  if jax.default_backend() == "cpu":
    peak, peak_source = flops.measure_cpu_matmul_peak(jnp.dtype(args.dtype)), (
        "f32 matmul measured in this run")
  else:
    peak = sum(flops.peak_flops(d.device_kind, args.dtype) or 0 for d in jax.devices())
    peak_source = "device table"
  print(f"peak {peak:.3g} FLOP/s ({peak_source})", flush=True)
  rows = []
  for name in args.models:
    for seq_len in args.seq_lens:
      batch = max(args.tokens_per_step // seq_len, 1)
      speed = {}
      for attention in ("hierarchical", "full"):
        config = ModelConfig(**MODELS[name], attention=attention, max_len=seq_len,
                             dropout_rate=0.0, dtype=args.dtype)
        seconds = step_seconds(config, batch, seq_len)
        tokens_per_sec = batch * seq_len / seconds
        model_flops = flops.flops_per_token_for_config(config, seq_len)
        mfu = flops.mfu(tokens_per_sec, model_flops, peak)
        speed[attention] = tokens_per_sec
        rows.append([name, seq_len, batch, attention, f"{seconds * 1e3:.0f}",
                     f"{tokens_per_sec:,.0f}", f"{model_flops / 1e6:.1f}", f"{100 * mfu:.1f}%"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
      rows[-1].append(f"{speed['hierarchical'] / speed['full']:.2f}x")
      rows[-2].append("")
  table = common.markdown_table(
      ["model", "seq_len", "batch", "attention", "step ms", "tokens/s", "MFLOPs/token",
       "MFU", "hier/full speed"], rows)
  note = (f"Peak: {peak:.3g} FLOP/s ({peak_source}). Compute dtype {args.dtype}, "
          f"{args.tokens_per_step} tokens per step, dropout off, AdamW update included. "
          "MFLOPs/token counts 6 x matmul parameters plus the attention actually computed "
          "(full: the whole L x L; hierarchical: about 3 blocks per level).")
  common.write_report(args.out, "Training throughput and MFU", [note, "", table])


if __name__ == "__main__":
  main()
