"""Decoding speed of `lm1b.sampling.generate`: hierarchical cache vs full-attention KV cache.

A randomly initialised model with the dimensions of gin/tiny.gin (weights do not change the
cost) generates `--lengths` tokens from a one-token prompt, EOS disabled so every row runs to
the end. Time is the median of repeated calls after a compile call; tokens/s counts generated
tokens of all rows.

  python -m benchmarks.decoding [--lengths 256 1024 4096] [--batch 4]
"""

import argparse
import dataclasses
import os

import jax
import numpy as np

from benchmarks import common
from lm1b import cli, run_config
from lm1b.model import DecoderLM
from lm1b.model_config import ModelConfig
from lm1b.sampling import generate
from lm1b.tokenizer import BOS_ID

TINY_GIN = os.path.join(common.REPO_DIR, "gin", "tiny.gin")


def tiny_config(attention: str, max_len: int) -> ModelConfig:
  """ModelConfig of gin/tiny.gin with the given attention and max_len."""
  cli.parse_gin([TINY_GIN], [])
  return dataclasses.replace(run_config.build().model, attention=attention, max_len=max_len)


def tokens_per_second(config: ModelConfig, length: int, batch: int) -> float:
  """Generated tokens per second for `batch` rows of `length` tokens."""
  tokens = np.full((1, 1), BOS_ID, np.int32)
  params = DecoderLM(config).init(jax.random.PRNGKey(0), tokens)["params"]
  prompts = np.full((batch, 1), BOS_ID, np.int32)
  lengths = np.ones((batch,), np.int32)
  run = lambda: generate(config, params, prompts, lengths, rng=jax.random.PRNGKey(1),
                         max_length=length, temperature=1.0, eos_id=-1)
  seconds = common.time_call(run, repeats=3)
  return batch * (length - 1) / seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "decoding.md"))
  args = parser.parse_args()
  rows = []
  for length in args.lengths:
    speeds = {}
    for attention in ("hierarchical", "full"):
      speeds[attention] = tokens_per_second(tiny_config(attention, length), length, args.batch)
      print(f"length {length} {attention}: {speeds[attention]:.0f} tokens/s", flush=True)
    rows.append([length, f"{speeds['hierarchical']:.0f}", f"{speeds['full']:.0f}",
                 f"{speeds['hierarchical'] / speeds['full']:.2f}x"])
  table = common.markdown_table(
      ["generated length", "hierarchical tokens/s", "full (KV cache) tokens/s",
       "hierarchical / full"], rows)
  note = (f"Tiny model of gin/tiny.gin (random weights), batch {args.batch}, one-token prompt, "
          "sampling at temperature 1, whole generation in one jitted `lax.while_loop`.")
  common.write_report(args.out, "Decoding speed (sample.py's generate)", [note, "", table])


if __name__ == "__main__":
  main()
