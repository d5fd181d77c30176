"""Fill of sentence rows vs packed rows, and the packer's speed.

Fill = real target tokens / token slots (rows x seq_len) over a whole epoch of training
batches (lm1b.batches.TrainBatches), for
  sentence                one sentence (piece) per row, the paper's setup;
  packed, full            packed rows for full attention (pieces anywhere);
  packed, hierarchical    packed rows for hierarchical attention, block 16: pieces at the
                          offsets hattention.packing_slot allows, so each sentence gets the
                          logits it would get alone;
on two length distributions:
  embedded corpus         the project's corpus tokenized by gin/tiny.gin's BPE-1024 tokenizer;
  LM1B-like               synthesized: words per sentence log-normal with mean 27 and
                          standard deviation 13 (LM1B: 0.8B words in 30.3M sentences), 1.15
                          pieces per word (a 32k SentencePiece vocabulary), + 1 EOS.
Also the time to plan and build one global batch of 256 rows of 256 positions.

  python -m benchmarks.packing [--seq_lens 64 256 1024] [--sentences 20000]
"""

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import common
from lm1b import batches, experiment, sources, tokenizer
from lm1b.model_config import ModelConfig
from lm1b.token_cache import TokenizedSplit

BLOCK = 16


def lm1b_like_split(sentences: int, seed: int = 0) -> TokenizedSplit:
  """A split whose sentence lengths follow the LM1B-like distribution of the docstring."""
  rng = np.random.default_rng(seed)
  mean, sd = 27.0, 13.0
  sigma = np.sqrt(np.log(1 + (sd / mean) ** 2))
  words = np.clip(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, sentences), 1, 400)
  lengths = np.maximum(1, np.round(words * 1.15)).astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.full(int(offsets[-1]), 7, np.uint16)
  return TokenizedSplit(tokens, offsets, np.round(words).astype(np.int32) + 1)


def embedded_split(sentences: int) -> TokenizedSplit:
  """The first `sentences` training sentences of the embedded corpus, BPE-1024 tokenized."""
  source = sources.make_source("embedded")
  with tempfile.TemporaryDirectory() as workdir:
    sample = (s for _, s in zip(range(sentences), source.sentences("train")))
    path = pathlib.Path(workdir) / "tokenizer.model"
    tokenizer.train_tokenizer(path, sample, vocab_size=1024, sample_sentences=sentences,
                              model_type="bpe", character_coverage=1.0)
    tok = tokenizer.load_tokenizer(path)
    texts = [s for _, s in zip(range(sentences), source.sentences("train"))]
  ids = tok.encode_batch(texts)
  lengths = np.array([len(x) for x in ids], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.array([t for x in ids for t in x], np.uint16)
  return TokenizedSplit(tokens, offsets, np.array([len(t.split()) + 1 for t in texts], np.int32))


def slots() -> dict[str, batches.Slot]:
  hierarchical = ModelConfig(attention="hierarchical", block_size=BLOCK)
  return {"sentence": batches.contiguous_slot, "packed, full": batches.contiguous_slot,
          "packed, hierarchical": experiment.packing_slot_for(hierarchical)}


def epoch_fill(split: TokenizedSplit, seq_len: int, mode: str, slot) -> float:
  """Real targets / slots over one epoch of 64-row batches."""
  it = batches.TrainBatches(split, global_batch=64, seq_len=seq_len, mode=mode, slot=slot)
  real = slots_used = 0
  while True:
    batch = next(it)
    real += float(batch["weights"].sum())
    slots_used += batch["weights"].size
    if it.state()["cursor"] == 0:
      return real / slots_used


def batch_ms(split: TokenizedSplit, mode: str, slot) -> float:
  """Milliseconds to plan and build one 256 x 256 global batch (median of 10)."""
  it = batches.TrainBatches(split, global_batch=256, seq_len=256, mode=mode, slot=slot)
  times = []
  for _ in range(10):
    start = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", type=int, nargs="+", default=[64, 256, 1024])
  parser.add_argument("--sentences", type=int, default=20000)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "packing.md"))
  args = parser.parse_args()
  data = {"embedded corpus (BPE 1024)": embedded_split(args.sentences),
          "LM1B-like (32k pieces)": lm1b_like_split(args.sentences)}
  rows = []
  for name, split in data.items():
    mean = float(np.mean(split.lengths() + 1))
    for seq_len in args.seq_lens:
      fills = {label: epoch_fill(split, seq_len, label.split(",")[0], slot)
               for label, slot in slots().items()}
      rows.append([name, f"{mean:.1f}", seq_len] + [f"{100 * f:.1f}%" for f in fills.values()]
                  + [f"{fills['packed, hierarchical'] / fills['sentence']:.2f}x"])
      print(" | ".join(map(str, rows[-1])), flush=True)
  speed = [[label, f"{batch_ms(data['LM1B-like (32k pieces)'], label.split(',')[0], slot):.1f}"]
           for label, slot in slots().items()]
  common.write_report(args.out, "Fill of sentence and packed rows", [
      f"{args.sentences} sentences per distribution; fill = real targets / slots over one "
      "epoch of 64-row batches; hierarchical packing for block size 16.", "",
      common.markdown_table(["data", "mean targets/sentence", "seq_len"] + list(slots())
                            + ["packed hierarchical / sentence"], rows), "",
      "Time to plan and build one 256 x 256 global batch (LM1B-like lengths, one process):",
      "", common.markdown_table(["mode", "ms per batch"], speed)])


if __name__ == "__main__":
  main()
