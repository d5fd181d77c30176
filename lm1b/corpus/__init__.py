"""The embedded default corpus: a synthetic English-like language with long-range structure.

`ensure_embedded_corpus()` generates it deterministically on first use (a few seconds, one core)
and writes it in the official LM1B tarball layout, so the tarball source's code path is the one
that reads it:

  <root>/embedded_corpus_v1/training-monolingual.tokenized.shuffled/news.en-000NN-of-00100
      NN = 01..10, 30,000 sentences each (300,000 train sentences)
  <root>/embedded_corpus_v1/heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050
      NN = 00 (the test split) and 01, 5,000 sentences each
  <root>/embedded_corpus_v1/stats.json   (sentence/word/byte counts per file, grammar version)

One sentence per line, tokenized like LM1B: space-separated tokens, punctuation split off, the
first word capitalised. Each shard has its own seeded numpy generator, so the bytes are the same
on every machine. About 1,200 word types, 6.9M tokens, 35 MB.

Long-range dependencies a model can learn: subject-verb agreement across relative clauses,
prepositional phrases and brackets; one tense per sentence (present or past) for every verb;
brackets and quotes closed in nested order; numbers repeated verbatim (with the matching plural
noun) many words after they were introduced; people introduced by full name and later referred to
by a gender-consistent pronoun, possessive or "Mr./Ms. Surname"; `if ... , then`, `either ... or`;
a topic per sentence (farm, harbour, lab, ...) that biases every noun choice.

`ensure_embedded_corpus(documents=True)` (gin: `make_source.kind = "embedded_documents"`) writes
the same layout under `embedded_documents_v1/` from its own seed, with 80% of the sentence
counts (24,000 per training shard, 4,000 per heldout shard: its sentences are longer, 29 tokens
against 23, so both corpora hold about 7.1M tokens, 35 MB), the sentences grouped into documents
of 20-200 sentences (consecutive lines, no separators; stats.json lists every shard's document
lengths) that share a topic, mostly one tense, a home place, and people and counted objects that
come back after 1 to 150 sentences. Generation takes about 1.3 times the default corpus's CPU
time. benchmarks/document_corpus.py measures how much caches of the previous 64 / 1024 / 4096
tokens lower a bigram model's perplexity on it.

The modules, each importing only those above it:

  vocabulary   the words: topics, nouns and plurals, verbs and their forms, names, numbers
  draws        `Draws`: the seeded stream of uniform floats every choice is made with
  context      `Context`: what the grammar asks of what a sentence is part of; `Independent`
  sentences    the sentence grammar: `draw_sentence`, `draw_sentences`
  documents    `draw_document`, `draw_documents`: the document plan and its sentence context
  writer       the shard layout, the two corpus variants, `ensure_embedded_corpus`
"""

from lm1b.corpus.documents import (MAX_DOCUMENT_SENTENCES, MIN_DOCUMENT_SENTENCES, Count,
                                   Document, Person, draw_document, draw_documents)
from lm1b.corpus.draws import Draws
from lm1b.corpus.sentences import (MAX_TOKENS, MIN_TOKENS, Clause, Sentence, draw_sentence,
                                   draw_sentences)
from lm1b.corpus.writer import (CORPUS_NAME, DOCUMENTS, DOCUMENTS_NAME, HELDOUT_DIR, SENTENCES,
                                TRAIN_DIR, Shard, Variant, ensure_embedded_corpus,
                                heldout_shard_name, shard_contents, shard_plan,
                                train_shard_name)

__all__ = [
  "CORPUS_NAME", "DOCUMENTS", "DOCUMENTS_NAME", "HELDOUT_DIR", "MAX_DOCUMENT_SENTENCES",
  "MAX_TOKENS", "MIN_DOCUMENT_SENTENCES", "MIN_TOKENS", "SENTENCES", "TRAIN_DIR", "Clause",
  "Count", "Document", "Draws", "Person", "Sentence", "Shard", "Variant", "draw_document",
  "draw_documents", "draw_sentence", "draw_sentences", "ensure_embedded_corpus",
  "heldout_shard_name", "shard_contents", "shard_plan", "train_shard_name",
]
