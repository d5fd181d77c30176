"""Does context beyond one sentence lower perplexity on the document corpus? A cache model.

Without training a network: a word-level model that sees the previous k tokens of the stream
(every sentence's words followed by "</s>", sentences in file order, as stream rows are cut).
With k = 0 it is a bigram model of the training split (Dirichlet-smoothed towards an add-one
unigram); with k > 0 it mixes in, for every window w of 64, 1024 and 4096 tokens up to k, a
unigram cache (how often the next word occurred in the previous w tokens) and a bigram cache
(how often it followed the current word there). The mixture weights, one set per bucket (the
smallest window in which the current word was followed by anything), are fitted by EM on
heldout shard 1; the perplexity is measured on the test shard (heldout shard 0), for three
corpora: the document corpus, the same corpus with its heldout sentences shuffled (the same
sentences, no documents), and the sentence-level default corpus.

  python -m benchmarks.document_corpus     # writes benchmarks/results/document_corpus.md
"""

import json
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from benchmarks import common
from lm1b import corpus, sources

CONTEXTS = (0, 64, 1024, 4096)
WINDOWS = (64, 1024, 4096)
END = "</s>"
_BETA = 10.0  # Dirichlet prior weight of the unigram in the bigram model
_EM_STEPS = 30


def stream_ids(sentences: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
  """[tokens] int64: each sentence's words then END; words outside `vocab` map to len(vocab)."""
  unknown = len(vocab)
  ids = [vocab.get(word, unknown) for sentence in sentences
         for word in sentence.split() + [END]]
  return np.asarray(ids, dtype=np.int64)


def _counts_in_windows(keys: np.ndarray, queries: np.ndarray, lo: np.ndarray,
                       hi: np.ndarray) -> np.ndarray:
  """[n] int64: for every i, how many j in [lo[i], hi[i]) have keys[j] == queries[i].

  keys, queries: [n] int64 >= -1; lo, hi: [n] int64 positions (clipped to [0, n]).
  """
  n = len(keys)
  order = np.sort((keys + 1) * n + np.arange(n))  # (key, position), both ascending
  base = (queries + 1) * n
  lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
  return np.searchsorted(order, base + hi) - np.searchsorted(order, base + lo)


class BigramModel:
  """Dirichlet-smoothed word bigram model: P(w | v) = (c(v, w) + beta P1(w)) / (c(v) + beta)."""

  def __init__(self, train: np.ndarray, vocab_size: int, end_id: int, beta: float = _BETA):
    self.size = vocab_size + 1  # + unknown
    self.end_id = end_id
    unigram = np.bincount(train, minlength=self.size).astype(np.float64)
    self.unigram = (unigram + 1) / (unigram.sum() + self.size)
    self.context = np.bincount(train[:-1], minlength=self.size).astype(np.float64)
    self.pairs, self.pair_counts = np.unique(train[:-1] * self.size + train[1:],
                                             return_counts=True)
    self.beta = beta

  def probabilities(self, stream: np.ndarray) -> np.ndarray:
    """[n] float64: P(stream[i] | stream[i - 1]); the first token follows an END."""
    previous = np.concatenate([[self.end_id], stream[:-1]])
    keys = previous * self.size + stream
    index = np.minimum(np.searchsorted(self.pairs, keys), len(self.pairs) - 1)
    pair = np.where(self.pairs[index] == keys, self.pair_counts[index], 0)
    return (pair + self.beta * self.unigram[stream]) / (self.context[previous] + self.beta)


class Cache(NamedTuple):
  """A window's cache components of every token of a stream."""
  probs: np.ndarray     # [2, n] float64: unigram-cache and bigram-cache probabilities
  has_previous: np.ndarray  # [n] bool: the previous token is followed by something in the window


def cache_components(stream: np.ndarray, window: int, size: int) -> Cache:
  """Unigram and bigram caches of the previous `window` tokens, for every token.

  Unigram: occurrences of stream[i] in stream[i - window:i] / the window's length. Bigram:
  occurrences of the pair (stream[i - 1], stream[i]) inside that window / occurrences of
  stream[i - 1] as a pair's first word there (0 when it has none).
  """
  n = len(stream)
  position = np.arange(n)
  start = position - window
  seen = np.maximum(np.minimum(position, window), 1)
  unigram = _counts_in_windows(stream, stream, start, position) / seen
  pairs = np.concatenate([[-1], stream[:-1] * size + stream[1:]])
  previous = np.concatenate([[-1], stream[:-1]])
  followed = _counts_in_windows(stream, previous, start, position - 1)
  bigram = _counts_in_windows(pairs, pairs, start + 1, position) / np.maximum(followed, 1)
  return Cache(np.stack([unigram, bigram]), followed > 0)


def fit_weights(components: np.ndarray, steps: int = _EM_STEPS) -> np.ndarray:
  """[c] mixture weights maximising the mean log of weights @ components ([c, n]) (EM)."""
  weights = np.full(len(components), 1.0 / len(components))
  for _ in range(steps):
    mixture = weights @ components
    weights = (weights[:, None] * components / mixture).mean(axis=1)
  return weights


class _Streams(NamedTuple):
  """Per-token component probabilities of one stream, for the contexts to compare."""
  bigram: np.ndarray  # [n]
  caches: dict[int, Cache]  # window -> its caches

  def mixture_inputs(self, context: int) -> tuple[np.ndarray, np.ndarray]:
    """([c, n] components, [n] bucket) of the model with `context` tokens.

    The bucket of a token is the smallest of the model's windows in which the previous token
    has a successor (the bigram caches up to there are 0), or the number of windows if none;
    every bucket has its own weights.
    """
    windows = [w for w in WINDOWS if w <= context]
    components = np.concatenate([self.bigram[None]] + [self.caches[w].probs for w in windows])
    bucket = np.full(len(self.bigram), len(windows))
    for index, window in reversed(list(enumerate(windows))):
      bucket[self.caches[window].has_previous] = index
    return components, bucket


def _streams(model: BigramModel, stream: np.ndarray) -> _Streams:
  caches = {window: cache_components(stream, window, model.size) for window in WINDOWS}
  return _Streams(model.probabilities(stream), caches)


def cache_log_probs(train: Sequence[str], tune: Sequence[str], test: Sequence[str],
                    contexts: Sequence[int] = CONTEXTS) -> dict[int, np.ndarray]:
  """{k: [test tokens] natural log-probabilities under the model with k tokens of context}.

  The model is fitted on `train` (bigram) and `tune` (mixture weights per bucket); sentences
  are strings of space-separated words, streamed in the given order.
  """
  words = sorted({word for sentence in train for word in sentence.split()} | {END})
  vocab = {word: i for i, word in enumerate(words)}
  model = BigramModel(stream_ids(train, vocab), len(vocab), vocab[END])
  tune, test = (_streams(model, stream_ids(s, vocab)) for s in (tune, test))
  results = {}
  for context in contexts:
    tune_components, tune_bucket = tune.mixture_inputs(context)
    test_components, test_bucket = test.mixture_inputs(context)
    probs = np.empty(test_components.shape[1])
    for bucket in np.unique(test_bucket):
      rows = tune_bucket == bucket
      weights = fit_weights(tune_components[:, rows]) if rows.any() else np.eye(
          len(test_components))[0]
      probs[test_bucket == bucket] = weights @ test_components[:, test_bucket == bucket]
    results[context] = np.log(probs)
  return results


def document_positions(sentences: Sequence[str], lengths: Sequence[int]) -> np.ndarray:
  """[tokens] int64: each stream token's offset from the start of its document.

  lengths: the documents' sentence counts, in order, summing to len(sentences).
  """
  sizes = np.array([len(sentence.split()) + 1 for sentence in sentences])  # + END
  token_lengths = np.add.reduceat(sizes, np.cumsum([0] + list(lengths[:-1])))
  starts = np.repeat(np.cumsum(token_lengths) - token_lengths, token_lengths)
  return np.arange(sizes.sum()) - starts


def perplexity(log_probs: np.ndarray) -> float:
  return float(np.exp(-log_probs.mean()))


def _heldout(path, shard: int) -> list[str]:
  return list(sources.TarballSource(path, test_shards=(shard,)).sentences("test"))


def _test_document_lengths(path) -> list[int]:
  stats = json.loads((path / "stats.json").read_text())
  test_file = corpus.heldout_shard_name(0)
  return next(entry["documents"] for entry in stats["files"] if entry["file"] == test_file)


BANDS = ((0, 64), (64, 1024), (1024, None))  # token offsets into the document


def measure(documents: bool, shuffled: bool = False) -> dict[str, dict[int, float]]:
  """{row name: {k: test perplexity}} on the full-size embedded corpus.

  Rows: "all" tokens and, for the document corpus in file order, the tokens whose offset into
  their document lies in each of BANDS.
  """
  path = corpus.ensure_embedded_corpus(documents=documents)
  train = list(sources.TarballSource(path).sentences("train"))
  tune, test = _heldout(path, 1), _heldout(path, 0)
  if shuffled:
    rng = np.random.default_rng(0)
    tune, test = ([s[i] for i in rng.permutation(len(s))] for s in (tune, test))
  log_probs = cache_log_probs(train, tune, test)
  masks = {"all": slice(None)}
  if documents and not shuffled:
    offsets = document_positions(test, _test_document_lengths(path))
    for lo, hi in BANDS:
      masks[f"{lo}-{hi - 1}" if hi else f">= {lo}"] = (offsets >= lo) & (offsets < (hi or 1 << 62))
  return {name: {k: perplexity(lp[mask]) for k, lp in log_probs.items()}
          for name, mask in masks.items()}


def _cells(result: dict[int, float]) -> list[str]:
  cells = [f"{result[CONTEXTS[0]]:.2f}"]
  for shorter, longer in zip(CONTEXTS, CONTEXTS[1:]):
    cells.append(f"{result[longer]:.2f} ({result[longer] / result[shorter] - 1:+.1%})")
  return cells


def main() -> None:
  rows, notes = [], []
  for corpus_name, documents, shuffled in (
      ("documents", True, False), ("documents, heldout sentences shuffled", True, True),
      ("sentences (default corpus)", False, False)):
    start = time.perf_counter()
    results = measure(documents, shuffled)
    for tokens, result in results.items():
      print(corpus_name, tokens, {k: round(v, 2) for k, v in result.items()}, flush=True)
      rows.append([corpus_name, tokens] + _cells(result))
    notes.append(f"{corpus_name} {time.perf_counter() - start:.0f} s")
  sections = [
      " ".join(__doc__.split("\n\n")[1].split()), "",
      "## Test perplexity (word level; in brackets: change against the next shorter context)",
      "", "Tokens: all test tokens, or those whose offset into their document (file order) lies "
      "in the range: the ones for which a context of that many tokens can reach back into "
      "their own document.", "",
      common.markdown_table(["corpus", "tokens"] + [f"k = {k}" for k in CONTEXTS], rows), "",
      "Tokens near the start of a document lose with longer caches: the window then holds "
      "the previous documents, and the weights are shared by all positions. A shuffled "
      "heldout shard (4,000 sentences, about 36 documents) still has sentences of the same "
      "document within a few thousand tokens of each other, where a long cache can find some "
      "of their names and counts.", "",
      f"Times (corpus generation on first use, reading, fitting, scoring): {'; '.join(notes)}.",
      ""]
  common.write_report(os.path.join(common.RESULTS_DIR, "document_corpus.md"),
                      "Context beyond one sentence on the document corpus (cache model)",
                      sections)


if __name__ == "__main__":
  main()
