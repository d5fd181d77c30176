"""Tokenization rate of the token cache build, and what it means for LM1B's training split.

Trains SentencePiece models on the embedded corpus (the tiny config's BPE and a unigram model),
then builds the train split's token cache from scratch into a temporary directory with one
encode thread and with all CPUs. The LM1B estimate divides its 30,301,028 training sentences by
the measured rate (LM1B sentences are a little longer than the embedded corpus's and its 32k
vocabulary is larger, so treat it as a rough figure).

  python -m benchmarks.tokenization [--sample_sentences 50000]
"""

import argparse
import os
import pathlib
import tempfile
import time

from benchmarks import common
from lm1b import sources, token_cache, tokenizer

LM1B_TRAIN_SENTENCES = 30_301_028
TOKENIZERS = {"bpe 1024 (gin/tiny.gin)": ("bpe", 1024), "unigram 700": ("unigram", 700)}


def build_seconds(source, tok, num_threads: int) -> tuple[float, int, int]:
  """(seconds, sentences, tokens) of building the train split's cache from scratch."""
  with tempfile.TemporaryDirectory() as cache_dir:
    start = time.perf_counter()
    split = token_cache.load_or_build_tokenized(source, "train", tok, cache_dir=cache_dir,
                                                num_threads=num_threads)
    seconds = time.perf_counter() - start
    return seconds, len(split), int(split.offsets[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sample_sentences", type=int, default=50_000,
                      help="sentences the tokenizers are trained on")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "tokenization.md"))
  args = parser.parse_args()
  source = sources.make_source(kind="embedded")
  cpus = os.cpu_count() or 1
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for label, (model_type, vocab) in TOKENIZERS.items():
      path = os.path.join(workdir, f"{model_type}.model")
      start = time.perf_counter()
      tokenizer.train_tokenizer(
          pathlib.Path(path), source.sentences("train"), vocab_size=vocab,
          sample_sentences=args.sample_sentences, model_type=model_type,
          character_coverage=1.0)
      train_seconds = time.perf_counter() - start
      tok = tokenizer.load_tokenizer(path)
      for threads in sorted({1, cpus}):
        seconds, sentences, tokens = build_seconds(source, tok, threads)
        rate = sentences / seconds
        lm1b_minutes = LM1B_TRAIN_SENTENCES / rate / 60
        rows.append([label, f"{train_seconds:.1f}", threads, f"{sentences:,}",
                     f"{tokens / sentences:.1f}", f"{seconds:.1f}", f"{rate:,.0f}",
                     f"{tokens / seconds:,.0f}", f"{lm1b_minutes:.1f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
  table = common.markdown_table(
      ["tokenizer", "training s", "encode threads", "sentences", "tokens/sentence",
       "cache build s", "sentences/s", "tokens/s", "LM1B train split (est. min)"], rows)
  note = (f"Embedded corpus train split; tokenizers trained on its first "
          f"{args.sample_sentences:,} sentences. Cache build = read shards, encode, write "
          "the memory-mapped cache. LM1B estimate: 30,301,028 sentences at the measured rate.")
  common.write_report(args.out, "Tokenization rate (token cache build)", [note, "", table])


if __name__ == "__main__":
  main()
