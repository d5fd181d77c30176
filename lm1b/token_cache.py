"""On-disk token cache: a split tokenized once into flat memory-mapped arrays, reused later.

Layout of `data_root()/token_cache/<key>/` (key = sha256 of the source name, the split's
fingerprint, the split name, the tokenizer model bytes and FORMAT_VERSION):
  tokens.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids, all sentences
               concatenated, no BOS/EOS
  offsets.npy  int64 [n + 1]; sentence i is tokens[offsets[i]:offsets[i + 1]]
  words.npy    int32 [n]; whitespace-separated words of sentence i, + 1 for the end of sentence
  meta.json    counts, dtype, source name, split, build time, the largest id and the sha256
               of each of the three array files

Opening a cache verifies it (`load_cache`): file sizes against meta.json, each file's sha256
(streamed, see README for the cost), and the largest id against the tokenizer's vocabulary.
A damaged cache raises CorruptTokenCacheError naming its directory; training moves it aside
(`<key>.corrupt-<n>`) and rebuilds it (`rebuild_damaged=True`), evaluation reports it.
Caches of FORMAT_VERSION 1 (no checksums) are not used: the version is part of the key.

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

FORMAT_VERSION = 2  # 2: checksums and the largest id in meta.json
CHECKSUMMED_FILES = ("tokens.bin", "offsets.npy", "words.npy")
_HASH_CHUNK = 1 << 24
CHUNK_SENTENCES = 10_000
LOG_EVERY_S = 5.0


class CorruptTokenCacheError(ValueError):
  """A token cache that differs from what was written; the message (one line) names it."""

  def __init__(self, directory: pathlib.Path, reason: str):
    super().__init__(f"token cache {directory} is damaged: {reason}")
    self.directory = directory


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
          "tokens": int(offsets[-1]), "max_id": _max_id(np.memmap(tmp / "tokens.bin", dtype))
          if offsets[-1] else -1, "sha256": {name: file_digest(tmp / name)
                                             for name in CHECKSUMMED_FILES},
          "build_seconds": round(time.time() - progress.start, 3)}


def file_digest(path: pathlib.Path) -> str:
  """sha256 hex digest of a file, read in 16 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _max_id(tokens: np.ndarray) -> int:
  return int(tokens.max()) if len(tokens) else -1


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


def _check_files(directory: pathlib.Path, meta: dict) -> None:
  """CorruptTokenCacheError unless the files have the sizes and checksums meta.json gives."""
  if not isinstance(meta.get("sha256"), dict):
    raise CorruptTokenCacheError(directory, "meta.json has no checksums")
  expected = {"tokens.bin": meta["tokens"] * np.dtype(meta["dtype"]).itemsize}
  for name in CHECKSUMMED_FILES:
    path = directory / name
    if not path.is_file():
      raise CorruptTokenCacheError(directory, f"{name} is missing")
    if name in expected and path.stat().st_size != expected[name]:
      raise CorruptTokenCacheError(directory, f"{name} has {path.stat().st_size} bytes, "
                                   f"meta.json says {expected[name]}")
    if file_digest(path) != meta["sha256"].get(name):
      raise CorruptTokenCacheError(directory, f"{name} does not match its checksum")


def load_cache(directory: str | os.PathLike, vocab_size: int | None = None) -> TokenizedSplit:
  """Memory-maps a complete cache directory (read-only arrays) after verifying it.

  vocab_size: every id must be below it (meta.json's max_id, computed when the cache was
  written; the checksum holds tokens.bin to it). Raises CorruptTokenCacheError naming the
  directory.
  """
  directory = pathlib.Path(directory)
  meta_path = directory / "meta.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"Token cache is incomplete (no meta.json): {directory}")
  try:
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    _check_files(directory, meta)
    tokens = (np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(meta["tokens"],))
              if meta["tokens"] else np.zeros(0, dtype))
    offsets = np.load(directory / "offsets.npy", mmap_mode="r")
    words = np.load(directory / "words.npy", mmap_mode="r")
  except CorruptTokenCacheError:
    raise
  except (ValueError, KeyError, TypeError, OSError) as error:
    raise CorruptTokenCacheError(directory, f"{type(error).__name__}: {error}") from error
  if len(offsets) != meta["sentences"] + 1 or len(words) != meta["sentences"]:
    raise CorruptTokenCacheError(directory, "its arrays disagree with meta.json")
  if vocab_size is not None and meta["max_id"] >= vocab_size:
    raise CorruptTokenCacheError(directory, f"it holds id {meta['max_id']}, outside the "
                                 f"tokenizer's vocabulary of {vocab_size}")
  return TokenizedSplit(tokens=tokens, offsets=offsets, words=words)


def _move_aside(final: pathlib.Path) -> pathlib.Path:
  """Renames a damaged cache to <key>.corrupt-<n> (kept for inspection); returns the path."""
  for index in itertools.count(1):
    target = final.with_name(f"{final.name}.corrupt-{index}")
    if not target.exists():
      os.rename(final, target)
      return target
  raise AssertionError("unreachable")


def load_or_build_tokenized(source, split: str, tokenizer, *,
                            cache_dir: str | os.PathLike | None = None,
                            num_threads: int | None = None,
                            rebuild_damaged: bool = False) -> TokenizedSplit:
  """Returns `split` of `source` tokenized by `tokenizer`, from the cache or built into it.

  cache_dir defaults to data_root()/token_cache; num_threads (SentencePiece encode threads)
  defaults to all CPUs. A damaged cache raises CorruptTokenCacheError, or with
  rebuild_damaged (training) is moved aside, logged in one line and rebuilt.
  """
  root = pathlib.Path(cache_dir) if cache_dir is not None else paths.data_root() / "token_cache"
  root.mkdir(parents=True, exist_ok=True)
  final = root / cache_key(source, split, tokenizer)
  damaged = None
  if (final / "meta.json").is_file():
    try:
      split_data = load_cache(final, tokenizer.vocab_size)
      logging.info("Reusing token cache %s", final)
      return split_data
    except CorruptTokenCacheError as error:
      if not rebuild_damaged:
        raise
      damaged = error
  # One process per data root builds (others, e.g. the other hosts of a pod sharing the
  # root, wait for the lock and then find the cache); a crashed builder's lock goes stale.
  build_lock = WorkdirLock(root, name=f".{final.name}.lock")
  build_lock.acquire_waiting(f"the token cache {final}")
  try:
    if damaged is not None and (final / "meta.json").is_file():
      try:  # another process may have rebuilt it meanwhile
        return load_cache(final, tokenizer.vocab_size)
      except CorruptTokenCacheError:
        logging.warning("%s; moved to %s, rebuilding it", damaged, _move_aside(final))
    if not (final / "meta.json").is_file():
      logging.info("Building token cache for %s/%s in %s", source.name, split, final)
      _build(final, source, split, tokenizer, num_threads)
  finally:
    build_lock.release()
  return load_cache(final, tokenizer.vocab_size)
