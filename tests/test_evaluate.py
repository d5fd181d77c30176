"""Tests of lm1b/evaluate.py: whole-split scoring against a sentence-by-sentence reference."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm1b import batches, evaluate, model, partitioning
from lm1b.model_config import ModelConfig
from lm1b.token_cache import TokenizedSplit
from lm1b.tokenizer import BOS_ID, EOS_ID

CONFIG = ModelConfig(vocab_size=40, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                     max_len=32, dropout_rate=0.0, block_size=4, dtype="float32")


def make_split(lengths, seed=0) -> TokenizedSplit:
  rng = np.random.default_rng(seed)
  sentences = [rng.integers(4, CONFIG.vocab_size, n) for n in lengths]
  offsets = np.cumsum([0] + list(lengths)).astype(np.int64)
  tokens = np.concatenate(sentences).astype(np.uint16)
  words = rng.integers(1, 6, len(lengths)).astype(np.int32)
  return TokenizedSplit(tokens, offsets, words)


def reference_nll(params, split: TokenizedSplit) -> float:
  """Sum over sentences of the NLL of [BOS] + ids + [EOS], each sentence fed on its own."""
  lm = model.DecoderLM(CONFIG)
  total = 0.0
  for i in range(len(split)):
    stream = np.concatenate([[BOS_ID], split.sentence(i), [EOS_ID]]).astype(np.int32)
    logits = lm.apply({"params": params}, jnp.asarray(stream[None, :-1]))
    log_probs = jax.nn.log_softmax(logits[0], axis=-1)
    total -= float(jnp.sum(log_probs[jnp.arange(len(stream) - 1), stream[1:]]))
  return total


@pytest.fixture(scope="module")
def params():
  variables = model.DecoderLM(CONFIG).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))
  return jax.device_get(nn.unbox(variables["params"]))


def test_evaluate_split_matches_a_sentence_by_sentence_reference(params):
  split = make_split([3, 7, 1, 12, 5, 9, 2])  # 7 sentences: one batch of 4 and a padded one
  mesh = partitioning.make_mesh()
  shardings = jax.tree.map(lambda _: partitioning.replicated(mesh), params)
  result = evaluate.Evaluator(CONFIG, mesh, shardings).run(
      params, batches.eval_batches(split, global_batch=4, seq_len=16), step=7)
  nll = reference_nll(params, split)
  tokens = int(split.lengths().sum()) + len(split)
  assert result["step"] == 7 and result["sentences"] == len(split)
  assert result["tokens"] == tokens and result["words"] == int(split.words.sum())
  assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
  assert result["per_token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
  assert result["per_word_perplexity"] == pytest.approx(math.exp(nll / split.words.sum()),
                                                        rel=1e-5)


def test_long_sentences_are_scored_once_and_max_batches_caps(params):
  split = make_split([30, 2, 4])  # the first sentence needs 4 rows of 8 targets
  mesh = partitioning.make_mesh()
  shardings = jax.tree.map(lambda _: partitioning.replicated(mesh), params)
  evaluator = evaluate.Evaluator(CONFIG, mesh, shardings)
  full = evaluator.run(params, batches.eval_batches(split, global_batch=2, seq_len=8))
  assert full["tokens"] == 30 + 2 + 4 + 3 and full["sentences"] == 3
  capped = evaluator.run(params, batches.eval_batches(split, global_batch=2, seq_len=8),
                         max_batches=1)
  assert capped["tokens"] == 16 and capped["sentences"] == 1
  asked = []
  stopped = evaluator.run(params, batches.eval_batches(split, global_batch=2, seq_len=8),
                          should_stop=lambda: asked.append(1) or len(asked) > 1)
  assert stopped is None and len(asked) == 2  # abandoned before the second batch


def test_summarize_adds_batches_in_float64():
  sums = [{"nll": 10.0, "tokens": 5.0, "words": 2.0, "sentences": 1.0},
          {"nll": 6.0, "tokens": 3.0, "words": 2.0, "sentences": 1.0}]
  result = evaluate.summarize(sums, step=3)
  assert result == {"step": 3, "sentences": 2, "tokens": 8, "words": 4, "loss": 2.0,
                    "per_token_perplexity": pytest.approx(math.exp(2.0)),
                    "per_word_perplexity": pytest.approx(math.exp(4.0))}
  assert math.isnan(evaluate.summarize([], step=None)["loss"])


def test_unigram_perplexity_of_a_known_distribution():
  def split(sentences):
    offsets = np.cumsum([0] + [len(s) for s in sentences])
    tokens = np.array([t for s in sentences for t in s], np.uint16)
    return TokenizedSplit(tokens, offsets, np.ones(len(sentences), np.int32))

  train_split = split([[4, 4, 5]] * 10)        # counts: 4 -> 20, 5 -> 10, EOS -> 10
  test_split = split([[4, 5]])                 # targets 4, 5, EOS
  vocab = 6
  counts = np.ones(vocab)
  counts[4] += 20
  counts[5] += 10
  counts[1] += 10
  probs = counts / counts.sum()
  expected = np.exp(-np.mean(np.log(probs[[4, 5, 1]])))
  assert evaluate.unigram_test_perplexity(train_split, test_split, vocab) == pytest.approx(
      expected)
