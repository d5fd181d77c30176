"""What verifying a token cache costs when it is opened (lm1b.token_cache.load_cache).

Times, on a cold and a warm page cache where possible, opening a cache with verification
(file sizes, the sha256 of each file, the largest id from meta.json) against memory-mapping it
alone, and the sha256 pass a build adds. Two caches: an existing one (e.g. the embedded
corpus's train split, `--cache DIR`) and a synthetic one of `--synthetic_sentences` sentences
of 32 random ids (LM1B's training split has 30.3M sentences of about 32 targets).

  python -m benchmarks.token_cache_check --cache ~/.cache/hlm1b/token_cache/<key> \
      --synthetic_sentences 30000000
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

from benchmarks import common
from lm1b import token_cache

TOKENS_PER_SENTENCE = 32
_WRITE_CHUNK = 1_000_000  # sentences per chunk written


def write_synthetic(directory: pathlib.Path, sentences: int, vocab_size: int = 32000) -> None:
  """A complete checksummed cache of `sentences` x TOKENS_PER_SENTENCE random uint16 ids."""
  rng = np.random.default_rng(0)
  with open(directory / "tokens.bin", "wb") as out:
    for start in range(0, sentences, _WRITE_CHUNK):
      count = min(_WRITE_CHUNK, sentences - start) * TOKENS_PER_SENTENCE
      out.write(rng.integers(4, vocab_size, count, dtype=np.uint16).tobytes())
  np.save(directory / "offsets.npy", np.arange(sentences + 1, dtype=np.int64)
          * TOKENS_PER_SENTENCE)
  np.save(directory / "words.npy", np.full(sentences, 27, np.int32))
  meta = {"dtype": "uint16", "sentences": sentences, "tokens": sentences * TOKENS_PER_SENTENCE,
          "max_id": vocab_size - 1, "vocab_size": vocab_size,
          "sha256": {name: token_cache.file_digest(directory / name)
                     for name in token_cache.CHECKSUMMED_FILES}}
  (directory / "meta.json").write_text(json.dumps(meta))


def drop_page_cache(directory: pathlib.Path) -> bool:
  """Asks the kernel to forget the cache files' pages (posix_fadvise); True if it could."""
  try:
    for name in token_cache.CHECKSUMMED_FILES:
      with open(directory / name, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True
  except (AttributeError, OSError):
    return False


def memmap_only(directory: pathlib.Path) -> None:
  """What opening cost before verification: memory-map the three arrays."""
  meta = json.loads((directory / "meta.json").read_text())
  np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
  np.load(directory / "offsets.npy", mmap_mode="r")
  np.load(directory / "words.npy", mmap_mode="r")


def measure(label: str, directory: pathlib.Path, rounds: int) -> list[object]:
  """[label, MB, cold verified s, warm verified s, warm memmap-only ms, GB/s warm]."""
  size = sum((directory / name).stat().st_size for name in token_cache.CHECKSUMMED_FILES)
  vocab = json.loads((directory / "meta.json").read_text()).get("vocab_size")
  cold = []
  for _ in range(rounds):
    if drop_page_cache(directory):
      start = time.perf_counter()
      token_cache.load_cache(directory, vocab)
      cold.append(time.perf_counter() - start)
  token_cache.load_cache(directory, vocab)  # warm the page cache
  warm = [common.time_call(lambda: token_cache.load_cache(directory, vocab), repeats=1,
                           warmup=0) for _ in range(rounds)]
  plain = [common.time_call(lambda: memmap_only(directory), repeats=1, warmup=0)
           for _ in range(rounds)]
  row = [label, f"{size / 1e6:,.1f}",
         f"{statistics.median(cold):.2f}" if cold else "n/a",
         f"{statistics.median(warm):.2f}", f"{statistics.median(plain) * 1e3:.2f}",
         f"{size / statistics.median(warm) / 1e9:.2f}"]
  print(" | ".join(row), flush=True)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache", action="append", default=[], help="an existing cache dir")
  parser.add_argument("--synthetic_sentences", type=int, default=30_000_000)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR,
                                                    "token_cache_check.md"))
  args = parser.parse_args()
  rows = [measure(f"{json.loads((pathlib.Path(c) / 'meta.json').read_text())['sentences']:,}"
                  " sentences (existing cache)", pathlib.Path(c), args.rounds)
          for c in args.cache]
  with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
    start = time.perf_counter()
    write_synthetic(pathlib.Path(tmp), args.synthetic_sentences)
    print(f"synthetic cache written in {time.perf_counter() - start:.1f} s", flush=True)
    rows.append(measure(f"{args.synthetic_sentences:,} sentences (synthetic)",
                        pathlib.Path(tmp), args.rounds))
  table = common.markdown_table(
      ["cache", "MB (3 files)", "open + verify, cold page cache s",
       "open + verify, warm s", "memmap only, ms", "verify GB/s (warm)"], rows)
  note = ("Verification = file sizes against meta.json, sha256 of tokens.bin, offsets.npy and "
          "words.npy (16 MiB reads), largest id from meta.json. A build adds one sha256 pass "
          "over the same bytes. Medians of the rounds; cold = after posix_fadvise(DONTNEED).")
  common.write_report(args.out, "Token cache verification cost", [note, "", table])


if __name__ == "__main__":
  main()
