"""Tests for lm1b.corpus: determinism, layout, atomic build, and the grammar's properties."""

import collections
import json
import re

import pytest

from lm1b import corpus, paths

SCALE = 0.01  # 300 sentences per training shard, 50 per heldout shard


def _files(root):
  return sorted(p for p in root.rglob("*") if p.is_file())


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

  def racing_build(target, scale):
    real_build(target, scale)
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


class _RecordingGenerator(corpus._Generator):
  """Records, for every clause, where its subject starts, its verb index and its number."""

  def _draw(self):
    self.clauses = []
    return super()._draw()

  def _clause(self, depth):
    start = len(self.out)
    plural = self._subject(depth)
    verb_index = len(self.out)
    self._verb_phrase(plural, depth)
    self.clauses.append((start, verb_index, plural))


def _sentences(count=3000):
  generator = _RecordingGenerator((7, 7))
  for _ in range(count):
    tokens = generator.sentence()
    yield tokens, generator.clauses, generator.past


def test_sentence_lengths_vocabulary_and_uniqueness():
  sentences = [tokens for tokens, _, _ in _sentences()]
  lengths = [len(s) for s in sentences]
  assert min(lengths) >= corpus.MIN_TOKENS and max(lengths) <= corpus.MAX_TOKENS
  assert 15 <= sum(lengths) / len(lengths) <= 35
  assert sum(n > 60 for n in lengths) >= 0.02 * len(lengths)  # long sentences exist
  assert len({" ".join(s) for s in sentences}) >= 0.99 * len(sentences)
  vocabulary = collections.Counter(t for s in sentences for t in s)
  assert 500 <= len(vocabulary) <= 2500
  assert all(" " not in t and t for t in vocabulary)
  assert all(s[-1] == "." and (s[0][0].isupper() or s[0] == '"') for s in sentences)


def test_brackets_and_quotes_close_in_nested_order():
  pairs = {")": "(", "]": "["}
  nested = 0
  for tokens, _, _ in _sentences():
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


def test_verbs_agree_with_distant_subjects_and_tense_is_constant():
  singular = {v[1] for v in corpus._INTRANS + corpus._TRANS + corpus._SAYS} | {"is"}
  plural = {v[0] for v in corpus._INTRANS + corpus._TRANS + corpus._SAYS} | {"are"}
  past = {v[2] for v in corpus._INTRANS + corpus._TRANS + corpus._SAYS} | {"was", "were"}
  distances = []
  for tokens, clauses, is_past in _sentences():
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


def test_numbers_and_names_are_reused():
  repeated = 0
  for tokens, _, _ in _sentences():
    text = " ".join(tokens)
    for number, noun in re.findall(r"all (\d+) (\S+) (?:were|are)", text):
      assert f"the {number} {noun}" in text.lower().split(", and all")[0], text
    for number in re.findall(r"only \d+ of the (\d+)", text):
      assert f"the {number} " in text.lower().split(", but only")[0], text
    counts = collections.Counter(t for t in tokens if t.isdigit() and len(t) <= 2)
    repeated += any(c >= 2 for c in counts.values())
    for i, token in enumerate(tokens):
      if token in ("Mr.", "Ms."):
        first_names = corpus._MALE if token == "Mr." else corpus._FEMALE
        surname = tokens[i + 1]
        assert any(tokens[j] in first_names and tokens[j + 1] == surname for j in range(i)), text
  assert repeated >= 150
