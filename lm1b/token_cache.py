"""On-disk token cache: a split tokenized once into flat memory-mapped arrays, reused later.

Layout of `data_root()/token_cache/<key>/` (key = sha256 of the source name, the split's
fingerprint, the split name, the tokenizer model bytes and FORMAT_VERSION):
  tokens.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids, all sentences
               concatenated, no BOS/EOS
  offsets.npy  int64 [n + 1]; sentence i is tokens[offsets[i]:offsets[i + 1]]
  words.npy    int32 [n]; whitespace-separated words of sentence i, + 1 for the end of sentence
  meta.json    counts, dtype, source name, split, build time

A cache is built in a temporary sibling directory and renamed into place when complete, so a
failed or interrupted build leaves no partial cache and an existing cache is never overwritten.
It is built once per data root: the builder holds a lock file `.<key>.lock` beside it (see
lm1b.workdir_lock, stale after a crash), and other processes wait for it, then read the cache.
"""

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Iterator

import numpy as np

from lm1b import paths
from lm1b.workdir_lock import WorkdirLock

FORMAT_VERSION = 1
CHUNK_SENTENCES = 10_000
LOG_EVERY_S = 5.0


@dataclasses.dataclass
class TokenizedSplit:
  """A tokenized split.

  tokens:  [total_tokens] uint16 | uint32, sentences concatenated (no BOS/EOS)
  offsets: [n + 1] int64, sentence i = tokens[offsets[i]:offsets[i + 1]]
  words:   [n] int32, whitespace words + 1 (for the end-of-sentence token)
  """
  tokens: np.ndarray
  offsets: np.ndarray
  words: np.ndarray

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def sentence(self, i: int) -> np.ndarray:
    """Token ids of sentence i, [length] of the tokens' dtype."""
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def lengths(self) -> np.ndarray:
    """[n] int64 token counts per sentence (without BOS/EOS)."""
    return np.diff(self.offsets)


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_key(source, split: str, tokenizer) -> str:
  """Hex digest naming the cache of `split` of `source` tokenized by `tokenizer`."""
  digest = hashlib.sha256()
  for part in (f"v{FORMAT_VERSION}", source.name, source.fingerprint(split), split):
    digest.update(part.encode("utf-8") + b"\0")
  digest.update(hashlib.sha256(tokenizer.model_bytes()).digest())
  return digest.hexdigest()[:32]


def _chunks(sentences: Iterator[str], size: int) -> Iterator[list[str]]:
  while chunk := list(itertools.islice(sentences, size)):
    yield chunk


def _encode_chunk(tokenizer, chunk: list[str], dtype: np.dtype, num_threads: int | None):
  """Returns (flat tokens [sum len] dtype, lengths [len(chunk)] int64, words [len(chunk)] int32)."""
  ids = tokenizer.encode_batch(chunk, num_threads=num_threads)
  lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
  flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum()))
  words = np.fromiter((len(s.split()) + 1 for s in chunk), np.int32, count=len(chunk))
  return flat, lengths, words


class _Progress:
  """Logs sentences done and sentences/s every LOG_EVERY_S seconds."""

  def __init__(self, label: str):
    self.label, self.start, self.last, self.done = label, time.time(), time.time(), 0

  def add(self, n: int, final: bool = False) -> None:
    self.done += n
    now = time.time()
    if final or now - self.last >= LOG_EVERY_S:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      logging.info("Tokenizing %s: %d sentences, %.0f sentences/s%s", self.label, self.done, rate,
                   " (done)" if final else "")


def _write_cache(tmp: pathlib.Path, source, split: str, tokenizer,
                 num_threads: int | None) -> dict:
  """Tokenizes the split into tmp/; encoding of chunk k overlaps reading chunk k + 1."""
  dtype = token_dtype(tokenizer.vocab_size)
  lengths, words = [np.zeros(1, np.int64)], []
  progress = _Progress(f"{source.name}/{split}")
  with open(tmp / "tokens.bin", "wb") as out, \
      concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = None
    for chunk in itertools.chain(_chunks(source.sentences(split), CHUNK_SENTENCES), [None]):
      future = (pool.submit(_encode_chunk, tokenizer, chunk, dtype, num_threads)
                if chunk is not None else None)
      if pending is not None:
        flat, chunk_lengths, chunk_words = pending.result()
        out.write(flat.tobytes())
        lengths.append(chunk_lengths)
        words.append(chunk_words)
        progress.add(len(chunk_words))
      pending = future
  offsets = np.cumsum(np.concatenate(lengths))
  np.save(tmp / "offsets.npy", offsets)
  np.save(tmp / "words.npy", np.concatenate(words) if words else np.zeros(0, np.int32))
  progress.add(0, final=True)
  return {"format_version": FORMAT_VERSION, "source": source.name, "split": split,
          "fingerprint": source.fingerprint(split), "tokenizer": str(tokenizer.path),
          "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "sentences": len(offsets) - 1,
          "tokens": int(offsets[-1]), "build_seconds": round(time.time() - progress.start, 3)}


def _build(final: pathlib.Path, source, split: str, tokenizer, num_threads: int | None) -> None:
  """Builds the cache in a temporary sibling dir, then renames it to `final`."""
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
  try:
    meta = _write_cache(tmp, source, split, tokenizer, num_threads)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / "meta.json").exists():
        raise
      logging.info("Token cache %s was built concurrently; using it", final)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Token cache %s: %d sentences, %d tokens in %.1f s", final, meta["sentences"],
               meta["tokens"], meta["build_seconds"])


def load_cache(directory: str | os.PathLike) -> TokenizedSplit:
  """Memory-maps a complete cache directory (read-only arrays)."""
  directory = pathlib.Path(directory)
  meta_path = directory / "meta.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"Token cache is incomplete (no meta.json): {directory}")
  meta = json.loads(meta_path.read_text())
  dtype = np.dtype(meta["dtype"])
  if meta["tokens"]:
    tokens = np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(meta["tokens"],))
  else:
    tokens = np.zeros(0, dtype)
  offsets = np.load(directory / "offsets.npy", mmap_mode="r")
  words = np.load(directory / "words.npy", mmap_mode="r")
  if len(offsets) != meta["sentences"] + 1 or len(words) != meta["sentences"]:
    raise ValueError(f"Token cache arrays disagree with meta.json: {directory}")
  return TokenizedSplit(tokens=tokens, offsets=offsets, words=words)


def load_or_build_tokenized(source, split: str, tokenizer, *,
                            cache_dir: str | os.PathLike | None = None,
                            num_threads: int | None = None) -> TokenizedSplit:
  """Returns `split` of `source` tokenized by `tokenizer`, from the cache or built into it.

  cache_dir defaults to data_root()/token_cache; num_threads (SentencePiece encode threads)
  defaults to all CPUs.
  """
  root = pathlib.Path(cache_dir) if cache_dir is not None else paths.data_root() / "token_cache"
  root.mkdir(parents=True, exist_ok=True)
  final = root / cache_key(source, split, tokenizer)
  if (final / "meta.json").is_file():
    logging.info("Reusing token cache %s", final)
    return load_cache(final)
  # One process per data root builds (others, e.g. the other hosts of a pod sharing the
  # root, wait for the lock and then find the cache); a crashed builder's lock goes stale.
  build_lock = WorkdirLock(root, name=f".{final.name}.lock")
  build_lock.acquire_waiting(f"the token cache {final}")
  try:
    if not (final / "meta.json").is_file():
      logging.info("Building token cache for %s/%s in %s", source.name, split, final)
      _build(final, source, split, tokenizer, num_threads)
  finally:
    build_lock.release()
  return load_cache(final)
