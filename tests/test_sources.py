"""Tests for lm1b.sources (file-based sources; the TFDS source is in test_sources_tfds.py)."""

import logging
import os
import re
import tracemalloc

import gin
import numpy as np
import pytest

from lm1b import corpus, paths, run_config, sources, text_lines
from lm1b.corpus import writer as corpus_writer

TRAIN = corpus.TRAIN_DIR
HELDOUT = corpus.HELDOUT_DIR


def _write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    data = data.encode("utf-8")
  path.write_bytes(data)
  return path


def _tarball(root):
  """A small LM1B layout; shard 00002 is written before 00001 to check the sorting."""
  _write(root / TRAIN / "news.en-00002-of-00100", "c d .\ne f .\n")
  _write(root / TRAIN / "news.en-00001-of-00100", "a b .\n")
  _write(root / TRAIN / "README", "not a shard\n")
  _write(root / HELDOUT / "news.en.heldout-00000-of-00050", "test one .\ntest two .\n")
  _write(root / HELDOUT / "news.en.heldout-00001-of-00050", "valid .\n")
  return root


def test_tarball_layout_and_test_shards(tmp_path):
  root = _tarball(tmp_path / "lm1b")
  source = sources.TarballSource(root)
  assert list(source.sentences("train")) == ["a b .", "c d .", "e f ."]
  assert list(source.sentences("test")) == ["test one .", "test two ."]
  assert list(sources.TarballSource(root, test_shards=(1,)).sentences("test")) == ["valid ."]
  both = sources.make_source("tarball", path=str(root), test_shards=(1, 0))
  assert list(both.sentences("test")) == ["valid .", "test one .", "test two ."]
  with pytest.raises(ValueError, match="validation"):
    list(source.sentences("validation"))


def test_embedded_source_reads_generated_corpus(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus_writer, "TRAIN_SENTENCES_PER_SHARD", 40)
  monkeypatch.setattr(corpus_writer, "HELDOUT_SENTENCES_PER_SHARD", 15)
  source = sources.make_source("embedded", path=str(tmp_path))
  assert isinstance(source, sources.EmbeddedSource) and source.name == "embedded_corpus_v1"
  train, test = list(source.sentences("train")), list(source.sentences("test"))
  assert len(train) == 400 and len(test) == 15
  assert train[0].endswith(" .") and set(train).isdisjoint(test)
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  assert sources.make_source().fingerprint("test") == source.fingerprint("test")


def test_embedded_documents_kind_via_gin(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(corpus_writer, "TRAIN_SENTENCES_PER_SHARD", 40)
  monkeypatch.setattr(corpus_writer, "HELDOUT_SENTENCES_PER_SHARD", 15)
  gin.parse_config(f"make_source.kind = 'embedded_documents'\nmake_source.path = '{tmp_path}'\n"
                   "train_and_evaluate.num_steps = 1")
  with caplog.at_level(logging.WARNING):
    source = run_config.build().source()
    train, test = list(source.sentences("train")), list(source.sentences("test"))
  assert isinstance(source, sources.EmbeddedSource) and source.name == "embedded_documents_v1"
  assert len(train) == 320 and len(test) == 12 and not caplog.records  # 80%; no empty lines
  default = sources.make_source("embedded", path=str(tmp_path))
  assert set(default.sentences("train")).isdisjoint(train)
  assert default.fingerprint("train") != source.fingerprint("train")


def test_text_globs(tmp_path):
  _write(tmp_path / "train" / "b.txt", "second file .\n")
  _write(tmp_path / "train" / "a.txt", "first file .\n")
  _write(tmp_path / "eval.txt", "held out .")  # no final newline
  source = sources.make_source("text", train_glob=str(tmp_path / "train" / "*.txt"),
                               test_glob=str(tmp_path / "eval.txt"))
  assert isinstance(source, sources.TextSource)
  assert list(source.sentences("train")) == ["first file .", "second file ."]
  assert list(source.sentences("test")) == ["held out ."]


def test_missing_paths_name_the_path(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    sources.TarballSource(missing)
  _write(tmp_path / "lm1b" / HELDOUT / "news.en.heldout-00000-of-00050", "x .\n")
  with pytest.raises(FileNotFoundError, match=re.escape(TRAIN)):
    sources.TarballSource(tmp_path / "lm1b")
  (tmp_path / "lm1b" / TRAIN).mkdir()
  with pytest.raises(FileNotFoundError, match="news.en-"):
    sources.TarballSource(tmp_path / "lm1b")
  _write(tmp_path / "lm1b" / TRAIN / "news.en-00001-of-00100", "y .\n")
  with pytest.raises(FileNotFoundError, match="heldout-00003"):
    sources.TarballSource(tmp_path / "lm1b", test_shards=(3,))
  pattern = str(tmp_path / "*.none")
  with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
    sources.TextSource(pattern, pattern)
  with pytest.raises(FileNotFoundError, match="test glob"):
    sources.TextSource(str(tmp_path / "lm1b" / TRAIN / "*"), pattern)


def test_empty_files_are_rejected(tmp_path):
  empty = _write(tmp_path / "empty.txt", b"")
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    sources.TextSource(str(empty), str(empty))
  blank = _write(tmp_path / "blank.txt", " \n\n\t\n")
  source = sources.TextSource(str(blank), str(blank))  # non-empty bytes: found on reading
  with pytest.raises(ValueError, match="no sentences"):
    list(source.sentences("train"))
  root = _tarball(tmp_path / "lm1b")
  _write(root / HELDOUT / "news.en.heldout-00000-of-00050", b"")
  with pytest.raises(ValueError, match="heldout-00000"):
    sources.TarballSource(root)


def test_bad_bytes_and_empty_lines_are_counted(tmp_path, caplog):
  path = _write(tmp_path / "bad.txt",
                b"good line .\n\n   \nbad \xff\xfe bytes .\n  padded  \r\n\xe2\x82\xac ok\n")
  source = sources.TextSource(str(path), str(path))
  with caplog.at_level(logging.INFO):
    result = list(source.sentences("train"))
  assert result == ["good line .", "bad \ufffd\ufffd bytes .", "padded", "\u20ac ok"]
  message = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
  assert len(message) == 1 and caplog.records[-1].levelno == logging.WARNING
  assert "6 lines -> 4 sentences; 2 empty skipped, 1 with invalid UTF-8 replaced" in message[0]


def test_long_lines_are_split_without_losing_text(tmp_path, caplog):
  words = [f"w{i}\u00e9\u65e5" for i in range(200_000)]  # multi-byte characters, ~1.6 MB
  long_line = " ".join(words)
  nospace = "x" * 10_000
  path = _write(tmp_path / "long.txt", f"short .\n{long_line}\n{nospace}\nend .\n")
  source = sources.TextSource(str(path), str(path))
  with caplog.at_level(logging.INFO):
    result = list(source.sentences("train"))
  assert result[0] == "short ." and result[-1] == "end ."
  pieces = result[1:-1]
  assert all(0 < len(p) <= text_lines.MAX_LINE_CHARS for p in pieces)
  assert all(p == p.strip() for p in pieces)
  hard = pieces[-3:]
  assert [len(p) for p in hard] == [4096, 4096, 1808] and "".join(hard) == nospace
  assert " ".join(pieces[:-3]).split() == words  # whitespace splits keep every word whole
  assert "4 lines -> %d sentences" % len(result) in caplog.records[-1].getMessage()
  assert "2 longer than 4096 chars split" in caplog.records[-1].getMessage()


def test_reading_streams_a_huge_line(tmp_path):
  path = _write(tmp_path / "huge.txt", ("abc " * 2_000_000) + "\n")  # one 8 MB line
  source = sources.TextSource(str(path), str(path))
  tracemalloc.start()
  count = sum(1 for _ in source.sentences("train"))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert count == 8_000_000 // 4096 + 1
  assert peak < 2_000_000, peak


def test_fingerprint_tracks_file_changes(tmp_path):
  root = _tarball(tmp_path / "lm1b")
  first = sources.TarballSource(root)
  again = sources.TarballSource(root)
  assert first.fingerprint("train") == again.fingerprint("train")
  assert first.fingerprint("train") != first.fingerprint("test")
  assert len(first.fingerprint("train")) == 64
  before = first.fingerprint("train")
  shard = root / TRAIN / "news.en-00002-of-00100"
  _write(shard, "c d .\ne g .\n")  # same size, new content
  stat = shard.stat()
  os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
  assert first.fingerprint("train") != before
  assert first.fingerprint("test") == again.fingerprint("test")


def test_make_source_kinds_and_gin(tmp_path):
  with pytest.raises(ValueError, match="'hdf5'"):
    sources.make_source("hdf5")
  with pytest.raises(ValueError, match="path"):
    sources.make_source("tarball")
  with pytest.raises(ValueError, match="test_glob"):
    sources.make_source("text", train_glob="*.txt")
  with pytest.raises(ValueError, match="train_glob"):
    sources.make_source("text", test_glob="*.txt")
  path = _write(tmp_path / "t.txt", "gin line .\n")
  gin.clear_config()
  try:
    gin.parse_config(f"make_source.kind = 'text'\nmake_source.train_glob = '{path}'\n"
                     "train_and_evaluate.num_steps = 1\n"
                     f"make_source.test_glob = '{path}'")
    assert list(run_config.build().source().sentences("test")) == ["gin line ."]
  finally:
    gin.clear_config()


def test_clean_lines_property_small_limit(monkeypatch):
  """Random lines, random chunking, a 20-char limit: pieces are bounded and lose no text."""
  monkeypatch.setattr(text_lines, "MAX_LINE_CHARS", 20)
  rng = np.random.default_rng(0)
  alphabet = list("ab\u00e9\u65e5") + [" ", "  ", "\t", "\u3000"]
  for _ in range(300):
    line = "".join(rng.choice(alphabet, size=rng.integers(0, 120)))
    cuts = sorted(rng.integers(0, len(line) + 1, size=rng.integers(0, 6)))
    chunks = [line[i:j] for i, j in zip([0] + cuts, cuts + [len(line)])]
    chunks[-1] += "\n"
    stats = text_lines.LineStats()
    pieces = list(text_lines.clean_lines(chunks, stats))
    assert all(0 < len(p) <= 20 and p == p.strip() for p in pieces), (line, pieces)
    assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", line)
    assert all(p in line for p in pieces)  # whitespace inside a piece is kept as it was
    if max(map(len, line.split()), default=0) <= 20:
      assert " ".join(pieces).split() == line.split()
    assert (stats.lines, stats.sentences, stats.empty) == (1, len(pieces), not pieces)
    assert stats.split == (len(pieces) > 1)
    if len(line.strip()) <= 20:
      assert pieces == ([line.strip()] if line.strip() else [])
