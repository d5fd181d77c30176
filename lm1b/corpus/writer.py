"""Writes an embedded corpus to disk in the official LM1B tarball layout, once per directory.

  <root>/<name>/training-monolingual.tokenized.shuffled/news.en-000NN-of-00100   NN = 01..10
  <root>/<name>/heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050
      NN = 00 (the test split) and 01
  <root>/<name>/stats.json   (sentence/token/byte counts per file, seed, generation time)

One sentence per line, tokens separated by spaces. Every shard is drawn from its own seed
(variant seed, split, shard index), so the bytes are the same on every machine.
"""

import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

from lm1b import paths
from lm1b.corpus.documents import draw_documents
from lm1b.corpus.sentences import draw_sentences

CORPUS_NAME = "embedded_corpus_v1"
DOCUMENTS_NAME = "embedded_documents_v1"
TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
NUM_TRAIN_SHARDS = 10
TRAIN_SENTENCES_PER_SHARD = 30_000
NUM_HELDOUT_SHARDS = 2
HELDOUT_SENTENCES_PER_SHARD = 5_000


def train_shard_name(index: int) -> str:
  """LM1B training shard file name, index counted from 1."""
  return f"news.en-{index:05d}-of-00100"


def heldout_shard_name(index: int) -> str:
  """LM1B heldout shard file name, index counted from 0 (00000 is the test set)."""
  return f"news.en.heldout-{index:05d}-of-00050"


class Variant(NamedTuple):
  """One embedded corpus: its directory name, seed, sentence drawer ((seed, count) ->
  (sentences as token lists, extra shard statistics)) and the share of the default sentence
  counts it writes per shard."""
  name: str
  seed: int
  draw: Callable[[tuple[int, ...], int], tuple[list[list[str]], dict]]
  share: float


SENTENCES = Variant(CORPUS_NAME, 1_000_003, draw_sentences, 1.0)
# Document sentences are longer (29 tokens against 23): 80% of the sentences give both corpora
# about 7.1M tokens.
DOCUMENTS = Variant(DOCUMENTS_NAME, 2_000_003, draw_documents, 0.8)


class Shard(NamedTuple):
  """One file of a corpus: its split directory, file name, seed and sentence count."""
  split_dir: str
  name: str
  seed: tuple[int, ...]
  sentences: int


def shard_plan(variant: Variant, scale: float = 1.0) -> list[Shard]:
  """Every shard of `variant` with `scale` times its sentence counts (at least 1): training
  shards 1..10, then heldout shards 0..1."""
  train = max(1, round(TRAIN_SENTENCES_PER_SHARD * scale * variant.share))
  heldout = max(1, round(HELDOUT_SENTENCES_PER_SHARD * scale * variant.share))
  plan = [Shard(TRAIN_DIR, train_shard_name(i), (variant.seed, 0, i), train)
          for i in range(1, NUM_TRAIN_SHARDS + 1)]
  plan += [Shard(HELDOUT_DIR, heldout_shard_name(i), (variant.seed, 1, i), heldout)
           for i in range(NUM_HELDOUT_SHARDS)]
  return plan


def shard_contents(variant: Variant, shard: Shard) -> tuple[bytes, dict]:
  """(the shard file's bytes, its entry in stats.json)."""
  sentences, extra = variant.draw(shard.seed, shard.sentences)
  data = ("\n".join(map(" ".join, sentences)) + "\n").encode("utf-8")
  tokens = sum(map(len, sentences))
  return data, {"file": shard.name, "sentences": shard.sentences, "tokens": tokens,
                "bytes": len(data), **extra}


def write_shard(target: pathlib.Path, variant: Variant, shard: Shard) -> dict:
  """Writes `shard` under the corpus directory `target`; returns its stats.json entry."""
  data, stats = shard_contents(variant, shard)
  (target / shard.split_dir / shard.name).write_bytes(data)
  return stats


def build(target: pathlib.Path, scale: float, variant: Variant) -> dict:
  """Writes every shard and stats.json into the empty directory `target`; returns the stats."""
  (target / TRAIN_DIR).mkdir()
  (target / HELDOUT_DIR).mkdir()
  start, cpu_start = time.perf_counter(), time.process_time()
  files = [write_shard(target, variant, shard) for shard in shard_plan(variant, scale)]
  stats = {"name": variant.name, "scale": scale, "seed": variant.seed, "files": files,
           "generation_seconds": round(time.perf_counter() - start, 2),
           "generation_cpu_seconds": round(time.process_time() - cpu_start, 2)}
  (target / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
  return stats


def ensure_embedded_corpus(root: pathlib.Path | None = None, *, scale: float = 1.0,
                           documents: bool = False) -> pathlib.Path:
  """Returns the embedded corpus directory under `root` (default data_root()), building it once.

  `scale` multiplies every shard's sentence count (tests use small values); a corpus with
  scale != 1 lives in its own directory `embedded_corpus_v1_scale<scale>`. documents=True gives
  the document corpus instead (`embedded_documents_v1[_scale<scale>]`). The corpus is built in
  a temporary directory beside the target and renamed into place, so readers never see a partial
  corpus and concurrent first uses are safe (the loser of the rename uses the winner's copy).
  """
  if not scale > 0:
    raise ValueError(f"ensure_embedded_corpus: scale must be > 0, got {scale!r}")
  root = pathlib.Path(root) if root is not None else paths.data_root()
  root.mkdir(parents=True, exist_ok=True)
  variant = DOCUMENTS if documents else SENTENCES
  name = variant.name if scale == 1.0 else f"{variant.name}_scale{scale:g}"
  target = root / name
  if target.is_dir():
    return target
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
  try:
    build(tmp, scale, variant)
    tmp.chmod(0o755)  # mkdtemp creates 0700
    os.rename(tmp, target)
  except OSError:
    if not target.is_dir():
      raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return target
