"""Tests for lm1b.corpus: determinism, layout, atomic build, the grammar's properties, and the
document corpus's references and their use to a cache model (benchmarks.document_corpus)."""

import collections
import functools
import hashlib
import json
import re

import numpy as np
import pytest

from benchmarks import document_corpus
from lm1b import corpus, paths

SCALE = 0.01  # 300 sentences per training shard, 50 per heldout shard
# sha256 of the scale-0.01 default corpus's shards (names and bytes), as first generated: the
# sentence-level corpus must not change when the generator code does.
DEFAULT_CORPUS_SHA256 = "788d16aa012d0e1985928743900da1182ace08c01258176337ca2a5bde74a856"


def _files(root):
  return sorted(p for p in root.rglob("*") if p.is_file())


def _shards_digest(root) -> str:
  digest = hashlib.sha256()
  for path in _files(root):
    if path.name != "stats.json":
      digest.update(path.name.encode())
      digest.update(path.read_bytes())
  return digest.hexdigest()


def test_data_root_env_and_creation(tmp_path, monkeypatch):
  target = tmp_path / "nested" / "root"
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(target))
  assert paths.data_root() == target
  assert target.is_dir()


def test_corpus_is_deterministic_and_in_tarball_layout(tmp_path):
  first = corpus.ensure_embedded_corpus(tmp_path / "a", scale=SCALE)
  second = corpus.ensure_embedded_corpus(tmp_path / "b", scale=SCALE)
  assert first.name == second.name == "embedded_corpus_v1_scale0.01"
  names = [p.relative_to(first).as_posix() for p in _files(first)]
  expected = [f"heldout-monolingual.tokenized.shuffled/news.en.heldout-0000{i}-of-00050"
              for i in range(2)]
  expected += [f"training-monolingual.tokenized.shuffled/news.en-000{i:02d}-of-00100"
               for i in range(1, 11)]
  assert sorted(names) == sorted(expected + ["stats.json"])
  for a, b in zip(_files(first), _files(second)):
    if a.name != "stats.json":  # stats.json holds the generation time
      assert a.read_bytes() == b.read_bytes(), a.name
  assert _shards_digest(first) == DEFAULT_CORPUS_SHA256
  stats = json.loads((first / "stats.json").read_text())
  counts = {f["file"]: f["sentences"] for f in stats["files"]}
  assert counts["news.en-00001-of-00100"] == 300
  assert counts["news.en.heldout-00000-of-00050"] == 50
  lines = (first / corpus.TRAIN_DIR / "news.en-00001-of-00100").read_text().splitlines()
  assert len(lines) == 300
  # Different shards come from different seeds.
  other = (first / corpus.TRAIN_DIR / "news.en-00002-of-00100").read_text().splitlines()
  assert len(set(lines) & set(other)) < 10


def test_default_root_and_reuse(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  path = corpus.ensure_embedded_corpus(scale=SCALE)
  assert path.parent == tmp_path
  stamp = (path / "stats.json").stat().st_mtime_ns

  def fail(*args):
    raise AssertionError("corpus rebuilt although it exists")

  monkeypatch.setattr(corpus, "_build", fail)
  assert corpus.ensure_embedded_corpus(scale=SCALE) == path
  assert (path / "stats.json").stat().st_mtime_ns == stamp


def test_concurrent_builder_wins_the_rename(tmp_path, monkeypatch):
  real_build = corpus._build

  def racing_build(target, scale, variant):
    real_build(target, scale, variant)
    monkeypatch.setattr(corpus, "_build", real_build)
    corpus.ensure_embedded_corpus(tmp_path, scale=scale)  # another process finishes first

  monkeypatch.setattr(corpus, "_build", racing_build)
  path = corpus.ensure_embedded_corpus(tmp_path, scale=SCALE)
  assert path.is_dir() and len(_files(path)) == 13
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # temporary dirs removed


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
  def broken(*args):
    raise RuntimeError("disk full")

  monkeypatch.setattr(corpus, "_write_shard", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    corpus.ensure_embedded_corpus(tmp_path, scale=SCALE)
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match="scale"):
    corpus.ensure_embedded_corpus(tmp_path, scale=0)


class _Recording:
  """Records, for every clause, where its subject starts, its verb index and its number, and
  for every accepted sentence (tokens, clauses, past) in `log`."""

  log: list

  def _draw(self):
    self.clauses = []
    return super()._draw()

  def sentence(self):
    tokens = super().sentence()
    self.log.append((tokens, self.clauses, self.past))
    return tokens

  def _clause(self, depth):
    start = len(self.out)
    plural = self._subject(depth)
    verb_index = len(self.out)
    self._verb_phrase(plural, depth)
    self.clauses.append((start, verb_index, plural))


class _RecordingSentences(_Recording, corpus._Generator):
  pass


class _RecordingDocuments(_Recording, corpus._DocumentGenerator):
  pass


@functools.cache
def _sentences(kind: str, count: int = 3000) -> list:
  """[(tokens, clauses, past)] of `count` sentences: independent ones or documents'."""
  generator = (_RecordingSentences if kind == "sentences" else _RecordingDocuments)((7, 7))
  generator.log = []
  while len(generator.log) < count:
    if kind == "sentences":
      generator.sentence()
    else:
      generator.document(100)
  return generator.log


KINDS = pytest.mark.parametrize("kind", ["sentences", "documents"])


@KINDS
def test_sentence_lengths_vocabulary_and_uniqueness(kind):
  sentences = [tokens for tokens, _, _ in _sentences(kind)]
  lengths = [len(s) for s in sentences]
  assert min(lengths) >= corpus.MIN_TOKENS and max(lengths) <= corpus.MAX_TOKENS
  assert 15 <= sum(lengths) / len(lengths) <= 35
  assert sum(n > 60 for n in lengths) >= 0.02 * len(lengths)  # long sentences exist
  assert len({" ".join(s) for s in sentences}) >= 0.99 * len(sentences)
  vocabulary = collections.Counter(t for s in sentences for t in s)
  assert 500 <= len(vocabulary) <= 2500
  assert all(" " not in t and t for t in vocabulary)
  assert all(s[-1] == "." and (s[0][0].isupper() or s[0] == '"') for s in sentences)


@KINDS
def test_brackets_and_quotes_close_in_nested_order(kind):
  pairs = {")": "(", "]": "["}
  nested = 0
  for tokens, _, _ in _sentences(kind):
    stack = []
    for token in tokens:
      if token in "([":
        stack.append(token)
        nested += len(stack) > 1
      elif token in pairs:
        assert stack and stack.pop() == pairs[token], " ".join(tokens)
    assert not stack, " ".join(tokens)
    assert tokens.count('"') % 2 == 0, " ".join(tokens)
  assert nested > 20


@KINDS
def test_verbs_agree_with_distant_subjects_and_tense_is_constant(kind):
  singular = {v[1] for v in corpus._INTRANS + corpus._TRANS + corpus._SAYS} | {"is"}
  plural = {v[0] for v in corpus._INTRANS + corpus._TRANS + corpus._SAYS} | {"are"}
  past = {v[2] for v in corpus._INTRANS + corpus._TRANS + corpus._SAYS} | {"was", "were"}
  distances = []
  for tokens, clauses, is_past in _sentences(kind):
    for start, verb_index, is_plural in clauses:
      verb = tokens[verb_index]
      if is_past:
        assert verb in past, (verb, " ".join(tokens))
        assert verb not in ("was", "were") or (verb == "were") == is_plural
      else:
        assert verb in (plural if is_plural else singular), (verb, " ".join(tokens))
      distances.append(verb_index - start)
    present_copula = {"is", "are"} & set(tokens)
    past_copula = {"was", "were"} & set(tokens)
    assert not (present_copula and past_copula), " ".join(tokens)
  assert max(distances) >= 15 and sum(d >= 8 for d in distances) > 100


@KINDS
def test_numbers_and_names_are_reused(kind):
  repeated = 0
  for tokens, _, _ in _sentences(kind):
    text = " ".join(tokens)
    for number, noun in re.findall(r"all (\d+) (\S+) (?:were|are)", text):  # a document's
      before = text.lower().split(", and all")[0]  # counts have an adjective
      assert re.search(rf"the {number} (\S+ )?{noun}\b", before), text
    for number in re.findall(r"only \d+ of the (\d+)", text):
      assert f"the {number} " in text.lower().split(", but only")[0], text
    counts = collections.Counter(t for t in tokens if t.isdigit() and len(t) <= 2)
    repeated += any(c >= 2 for c in counts.values())
    for i, token in enumerate(tokens if kind == "sentences" else ()):  # documents: below
      if token in ("Mr.", "Ms."):
        first_names = corpus._MALE if token == "Mr." else corpus._FEMALE
        surname = tokens[i + 1]
        assert any(tokens[j] in first_names and tokens[j + 1] == surname for j in range(i)), text
  assert repeated >= 150


# -- the document corpus ------------------------------------------------------------------------


def test_document_corpus_has_the_default_layout_and_is_deterministic(tmp_path):
  first = corpus.ensure_embedded_corpus(tmp_path / "a", scale=SCALE, documents=True)
  second = corpus.ensure_embedded_corpus(tmp_path / "b", scale=SCALE, documents=True)
  default = corpus.ensure_embedded_corpus(tmp_path / "a", scale=SCALE)
  assert first.name == "embedded_documents_v1_scale0.01"
  relative = lambda root: [p.relative_to(root).as_posix() for p in _files(root)]
  assert relative(first) == relative(default)
  assert _shards_digest(first) == _shards_digest(second) != _shards_digest(default)
  assert _shards_digest(default) == DEFAULT_CORPUS_SHA256
  stats = json.loads((first / "stats.json").read_text())
  assert stats["name"] == corpus.DOCUMENTS_NAME and len(stats["files"]) == 12
  shard_texts = []
  for entry in stats["files"]:
    sub = corpus.HELDOUT_DIR if "heldout" in entry["file"] else corpus.TRAIN_DIR
    text = (first / sub / entry["file"]).read_text()
    lines = text.split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # one sentence a line, no blank lines
    # 80% of the default counts (longer sentences, about the same tokens)
    assert len(lines) - 1 == entry["sentences"] == (40 if sub == corpus.HELDOUT_DIR else 240)
    assert sum(entry["documents"]) == entry["sentences"]
    assert all(corpus.MIN_DOCUMENT_SENTENCES <= n < corpus.MAX_DOCUMENT_SENTENCES
               + corpus.MIN_DOCUMENT_SENTENCES for n in entry["documents"])
    shard_texts.append(set(lines[:-1]))
  assert len(shard_texts[0] & shard_texts[1]) < 10  # shards have their own seeds


@functools.cache
def _documents():
  """[(sentences as token lists, opening entities)] of 24 documents of 20..200 sentences."""
  generator = corpus._DocumentGenerator((11, 11))
  return [(generator.document(length), generator.doc.opening)
          for length in (20, 60, 130, 200) * 6]


def _names_in(tokens):
  """(index, first name, surname) of every full name in a sentence."""
  return [(i, tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1)
          if tokens[i] in corpus._FEMALE + corpus._MALE and tokens[i + 1] in corpus._SURNAMES]


def test_document_references_resolve_to_earlier_full_names():
  checked = crossing = 0
  for sentences, _ in _documents():
    introduced = set()  # (surname, female) of every full name so far in the document
    for tokens in sentences:
      names = _names_in(tokens)
      for i, token in enumerate(tokens):
        if token in ("Mr.", "Ms."):
          key = (tokens[i + 1], token == "Ms.")
          here = {(s, f in corpus._FEMALE) for j, f, s in names if j < i}
          assert key in introduced | here, " ".join(tokens)
          checked += 1
          crossing += key not in here
      introduced |= {(s, f in corpus._FEMALE) for _, f, s in names}
  assert checked > 300 and crossing > 200


def test_document_entities_come_back_at_short_medium_and_long_distances():
  gaps = []
  for sentences, _ in _documents():
    # Per sentence: its surnames and its counts ("the 37 wooden barrels": ("37", "wooden")).
    entities = [{t for t in tokens if t in corpus._SURNAMES}
                | {tuple(tokens[i + 1:i + 3]) for i in range(len(tokens) - 2)
                   if tokens[i] == "the" and tokens[i + 2] in corpus._ADJECTIVES
                   and tokens[i + 1].isdigit()}
                for tokens in sentences]
    where = collections.defaultdict(list)
    for index, found in enumerate(entities):
      for entity in found:
        where[entity].append(index)
    gaps += [gap for hits in where.values() for gap in np.diff(hits)]
  gaps = np.array(gaps)
  short, medium, far = ((gaps >= lo) & (gaps <= hi) for lo, hi in ((1, 3), (10, 30), (50, 150)))
  assert len(gaps) > 1500 and short.mean() > 0.2 and medium.mean() > 0.15 and far.mean() > 0.1


def test_document_opening_facts_come_back_only_at_its_end():
  for sentences, opening in _documents():
    texts = [" ".join(tokens) for tokens in sentences]
    year = sentences[0][1]
    assert texts[0].startswith(f"In {year} ,") and texts[-1].startswith(f"In {year} ,")
    founders = [e for e in opening if isinstance(e, corpus._Person)]
    counts = [e for e in opening if isinstance(e, corpus._Count)]
    assert texts[0].startswith(f"In {year} , {founders[0].first} {founders[0].surname} , ")
    patterns = [rf"\b{p.surname}\b" for p in founders]
    patterns += [rf"the {c.number} {c.adjective} {c.noun}\b" for c in counts]
    for pattern in patterns:
      hits = [i for i, text in enumerate(texts) if re.search(pattern, text)]
      assert hits[0] <= 1 and hits[-1] >= len(texts) - 3, (pattern, hits)
      assert all(i <= 1 or i >= len(texts) - 3 for i in hits), (pattern, hits)


def _cache_perplexities(draw) -> dict[str, dict[int, float]]:
  """Test perplexities per context k of the cache model: {"all": ...} and, for documents,
  {"near": ..., "far": ...} on the tokens < 1024 and >= 1024 into their document."""
  train = [" ".join(s) for s in draw((0, 0), 10_000)[0]]
  tune = [" ".join(s) for s in draw((0, 1), 1_500)[0]]
  test, stats = draw((0, 2), 2_500)
  test = [" ".join(s) for s in test]
  log_probs = document_corpus.cache_log_probs(train, tune, test)
  masks = {"all": slice(None)}
  if "documents" in stats:
    far = document_corpus.document_positions(test, stats["documents"]) >= 1024
    masks.update(near=~far, far=far)
  return {name: {k: document_corpus.perplexity(lp[mask]) for k, lp in log_probs.items()}
          for name, mask in masks.items()}


def test_context_beyond_one_sentence_lowers_perplexity_on_documents_only():
  documents = _cache_perplexities(corpus.draw_documents)
  every, near, far = documents["all"], documents["near"], documents["far"]
  assert every[0] > every[64] > every[1024] > every[4096]
  assert every[1024] < 0.9 * every[64]
  assert far[4096] < 0.95 * far[1024]  # what lies more than 1024 tokens back is used ...
  assert abs(near[4096] / near[1024] - 1) < 0.02  # ... and only where a document has it
  sentences = _cache_perplexities(corpus.draw_sentences)["all"]
  assert sentences[1024] > 0.9 * sentences[64] and sentences[4096] > 0.95 * sentences[1024]
