"""Tests for lm1b/token_cache.py: build, memmap reuse, keys, atomicity, progress log."""

import hashlib
import json
import logging
import os
import re
import threading
import time

import numpy as np
import pytest

from lm1b import token_cache, tokenizer as tok
from tests.fake_source import ListSource, random_sentences


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  source = ListSource({"train": random_sentences(1500)})
  return [tok.load_or_train_tokenizer(tmp_path_factory.mktemp(f"w{v}") / "tokenizer.model",
                                      source, vocab_size=v)
          for v in (45, 60)]


@pytest.fixture
def data_root(tmp_path, monkeypatch):
  monkeypatch.setenv("HLM1B_DATA_ROOT", str(tmp_path / "root"))
  return tmp_path / "root"


def test_build_matches_tokenizer_and_reuse_is_memmap(tokenizers, data_root, caplog):
  tokenizer = tokenizers[0]
  sentences = random_sentences(250, seed=3)
  source = ListSource({"test": sentences})
  with caplog.at_level(logging.INFO):
    built = token_cache.load_or_build_tokenized(source, "test", tokenizer, num_threads=2)
  assert "sentences/s" in caplog.text
  assert len(built) == 250
  assert built.tokens.dtype == np.uint16 and built.offsets.dtype == np.int64
  assert built.words.dtype == np.int32
  for i, sentence in enumerate(sentences):
    assert built.sentence(i).tolist() == tokenizer.encode(sentence)
    assert built.words[i] == len(sentence.split()) + 1
  cache_dirs = list((data_root / "token_cache").iterdir())
  assert len(cache_dirs) == 1
  names = sorted(p.name for p in cache_dirs[0].iterdir())
  assert names == ["meta.json", "offsets.npy", "tokens.bin", "words.npy"]
  mtimes = {p.name: os.stat(p).st_mtime_ns for p in cache_dirs[0].iterdir()}

  again = token_cache.load_or_build_tokenized(source, "test", tokenizer)
  assert source.reads == 1  # the second call read nothing from the source
  assert isinstance(again.tokens, np.memmap) and not again.tokens.flags.writeable
  assert isinstance(again.offsets, np.memmap)
  np.testing.assert_array_equal(again.tokens, built.tokens)
  np.testing.assert_array_equal(again.offsets, built.offsets)
  np.testing.assert_array_equal(again.words, built.words)
  assert {p.name: os.stat(p).st_mtime_ns for p in cache_dirs[0].iterdir()} == mtimes


def test_chunked_build_equals_single_chunk(tokenizers, tmp_path, monkeypatch):
  sentences = random_sentences(101, seed=4)
  whole = token_cache.load_or_build_tokenized(ListSource({"train": sentences}), "train",
                                              tokenizers[0], cache_dir=tmp_path / "a")
  monkeypatch.setattr(token_cache, "CHUNK_SENTENCES", 7)
  chunked = token_cache.load_or_build_tokenized(ListSource({"train": sentences}), "train",
                                                tokenizers[0], cache_dir=tmp_path / "b")
  np.testing.assert_array_equal(whole.tokens, chunked.tokens)
  np.testing.assert_array_equal(whole.offsets, chunked.offsets)
  np.testing.assert_array_equal(whole.words, chunked.words)


def test_key_depends_on_tokenizer_split_and_data(tokenizers):
  source = ListSource({"train": ["a b"], "test": ["a b"]})
  other = ListSource({"train": ["a b c"], "test": ["a b"]})
  keys = {token_cache.cache_key(source, "train", tokenizers[0]),
          token_cache.cache_key(source, "train", tokenizers[1]),
          token_cache.cache_key(source, "test", tokenizers[0]),
          token_cache.cache_key(other, "train", tokenizers[0])}
  assert len(keys) == 4
  assert token_cache.cache_key(source, "train", tokenizers[0]) == token_cache.cache_key(
      ListSource({"train": ["a b"]}), "train", tokenizers[0])


def test_different_tokenizers_get_different_caches(tokenizers, tmp_path):
  source = ListSource({"train": random_sentences(20, seed=5)})
  a = token_cache.load_or_build_tokenized(source, "train", tokenizers[0], cache_dir=tmp_path)
  b = token_cache.load_or_build_tokenized(source, "train", tokenizers[1], cache_dir=tmp_path)
  assert len(list(tmp_path.iterdir())) == 2
  assert a.tokens.tolist() != b.tokens.tolist()


def test_failed_build_leaves_no_cache(tokenizers, tmp_path, monkeypatch):
  monkeypatch.setattr(token_cache, "CHUNK_SENTENCES", 10)
  source = ListSource({"train": random_sentences(100, seed=6)}, fail_after=55)
  with pytest.raises(RuntimeError, match="simulated"):
    token_cache.load_or_build_tokenized(source, "train", tokenizers[0], cache_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_failed_build_keeps_existing_cache(tokenizers, tmp_path):
  sentences = random_sentences(30, seed=7)
  good = token_cache.load_or_build_tokenized(ListSource({"train": sentences}), "train",
                                             tokenizers[0], cache_dir=tmp_path)
  (cache,) = tmp_path.iterdir()
  before = {p.name: p.read_bytes() for p in cache.iterdir()}
  # Same key (same data => same fingerprint), but this reader fails: the cache is simply reused.
  failing = ListSource({"train": sentences}, fail_after=3)
  reused = token_cache.load_or_build_tokenized(failing, "train", tokenizers[0],
                                               cache_dir=tmp_path)
  assert failing.reads == 0
  np.testing.assert_array_equal(reused.tokens, good.tokens)
  assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


def test_incomplete_cache_dir_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="meta.json"):
    token_cache.load_cache(tmp_path)


def test_token_dtype():
  assert token_cache.token_dtype(8000) == np.uint16
  assert token_cache.token_dtype(65536) == np.uint16
  assert token_cache.token_dtype(65537) == np.uint32


class SlowListSource(ListSource):
  """A ListSource whose reading takes a while, so that concurrent builders overlap."""

  def sentences(self, split):
    for sentence in super().sentences(split):
      time.sleep(0.002)
      yield sentence


def test_concurrent_builders_build_once_and_share_the_cache(tokenizers, tmp_path):
  source = SlowListSource({"train": random_sentences(300, seed=4), "test": []})
  results = [None, None]

  def load(i):
    results[i] = token_cache.load_or_build_tokenized(source, "train", tokenizers[0],
                                                     cache_dir=tmp_path)
  threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  assert source.reads == 1  # one builder; the other waited for its lock, then loaded
  np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
  assert [p.name for p in tmp_path.iterdir()] == [token_cache.cache_key(source, "train",
                                                                         tokenizers[0])]


def _built(tokenizer, directory):
  """A cache of 200 sentences in directory: (source, split (a copy), cache path, original
  bytes by name)."""
  source = ListSource({"train": random_sentences(200, seed=8)})
  split = token_cache.load_or_build_tokenized(source, "train", tokenizer, cache_dir=directory)
  (cache,) = directory.iterdir()
  copy = token_cache.TokenizedSplit(*(np.array(a) for a in (split.tokens, split.offsets,
                                                               split.words)))
  return source, copy, cache, {p.name: p.read_bytes() for p in cache.iterdir()}


def _garble_ids(cache):
  """A fifth of the ids replaced by other valid ids (what a bad disk or a stray write does)."""
  tokens = np.fromfile(cache / "tokens.bin", np.uint16)
  tokens[::5] = (tokens[::5] + 1) % 40 + 4
  tokens.tofile(cache / "tokens.bin")


def _truncate_tokens(cache):
  with open(cache / "tokens.bin", "r+b") as f:
    f.truncate(11)


def _out_of_vocabulary(cache):
  """A cache whose ids reach beyond the tokenizer's vocabulary (meta.json's max_id)."""
  meta = json.loads((cache / "meta.json").read_text())
  (cache / "meta.json").write_text(json.dumps(dict(meta, max_id=999)))


def _no_checksums(cache):
  meta = json.loads((cache / "meta.json").read_text())
  del meta["sha256"]
  (cache / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, reason", [
    (_garble_ids, "tokens.bin does not match its checksum"),
    (_truncate_tokens, r"tokens.bin has 11 bytes, meta.json says \d+"),
    (_out_of_vocabulary, "holds id 999, outside the tokenizer's vocabulary"),
    (_no_checksums, "meta.json has no checksums"),
])
def test_a_damaged_cache_is_reported_or_moved_aside_and_rebuilt(tokenizers, tmp_path, damage,
                                                                 reason):
  source, good, cache, original = _built(tokenizers[0], tmp_path)
  damage(cache)
  with pytest.raises(token_cache.CorruptTokenCacheError) as raised:
    token_cache.load_or_build_tokenized(source, "train", tokenizers[0], cache_dir=tmp_path)
  message = str(raised.value)
  assert message.startswith(f"token cache {cache} is damaged: ") and "\n" not in message
  assert re.search(reason, message), message
  rebuilt = token_cache.load_or_build_tokenized(source, "train", tokenizers[0],
                                                cache_dir=tmp_path, rebuild_damaged=True)
  np.testing.assert_array_equal(rebuilt.tokens, good.tokens)
  assert source.reads == 2 and (tmp_path / f"{cache.name}.corrupt-1").is_dir()  # kept
  assert {p.name: p.read_bytes() for p in cache.iterdir() if p.name != "meta.json"} == {
      name: data for name, data in original.items() if name != "meta.json"}


def test_checksums_and_largest_id_are_written_with_the_cache(tokenizers, tmp_path):
  _, split, cache, _ = _built(tokenizers[0], tmp_path)
  meta = json.loads((cache / "meta.json").read_text())
  assert meta["max_id"] == int(np.max(split.tokens)) < tokenizers[0].vocab_size
  assert meta["sha256"] == {name: hashlib.sha256((cache / name).read_bytes()).hexdigest()
                            for name in token_cache.CHECKSUMMED_FILES}
