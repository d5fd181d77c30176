"""Test helpers: an in-memory SentenceSource and TokenizedSplits built from id lists."""

import hashlib
import random

import numpy as np

from lm1b.sources import SentenceSource
from lm1b.token_cache import TokenizedSplit

WORDS = ("the farmer saw a red boat near harbour while three small dogs were running quickly "
         "because it rained and she said that every old machine in lab is broken ( again ) .")


class ListSource(SentenceSource):
  """Sentences from Python lists; `fail_after` raises after yielding that many sentences."""

  def __init__(self, splits: dict[str, list[str]], name: str = "list", fail_after=None):
    self.name, self._splits, self._fail_after = name, splits, fail_after
    self.reads = 0

  def sentences(self, split: str):
    self.reads += 1
    for i, sentence in enumerate(self._splits[split]):
      if self._fail_after is not None and i == self._fail_after:
        raise RuntimeError(f"simulated read failure at sentence {i}")
      yield sentence

  def fingerprint(self, split: str) -> str:
    return hashlib.sha256("\n".join(self._splits[split]).encode()).hexdigest()


def random_sentences(n: int, seed: int = 0, max_words: int = 20) -> list[str]:
  """n plain sentences of 1..max_words words drawn from WORDS."""
  rng = random.Random(seed)
  words = WORDS.split()
  return [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_words)))
          for _ in range(n)]


def split_from_ids(sentences: list[list[int]], words: list[int] | None = None) -> TokenizedSplit:
  """An in-memory TokenizedSplit (uint16 tokens) from lists of ids."""
  lengths = [len(s) for s in sentences]
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.array([t for s in sentences for t in s], np.uint16)
  words = np.array(words if words is not None else [len(s) + 1 for s in sentences], np.int32)
  return TokenizedSplit(tokens=tokens, offsets=offsets, words=words)


def unique_token_split(lengths: list[int]) -> TokenizedSplit:
  """Sentence i has `lengths[i]` ids, all ids in the split distinct (>= 4); words = i + 2."""
  sentences, next_id = [], 4
  for length in lengths:
    sentences.append(list(range(next_id, next_id + length)))
    next_id += length
  return split_from_ids(sentences, words=[i + 2 for i in range(len(lengths))])
