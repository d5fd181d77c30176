"""Tests for lm1b/tokenizer.py: training, reuse, round trip, special ids, errors."""

import os

import pytest

from lm1b import tokenizer as tok
from tests.fake_source import ListSource, random_sentences

VOCAB = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("work")
  source = ListSource({"train": random_sentences(2000)})
  return workdir, tok.load_or_train_tokenizer(workdir / "tokenizer.model", source,
                                              vocab_size=VOCAB, sample_sentences=1000)


def test_special_ids_are_fixed():
  assert (tok.PAD_ID, tok.EOS_ID, tok.BOS_ID, tok.UNK_ID) == (0, 1, 2, 3)


def test_trained_model_written_with_vocab(trained):
  workdir, tokenizer = trained
  assert tokenizer.path == workdir / "tokenizer.model"
  assert tokenizer.path.is_file()
  assert tokenizer.vocab_size == VOCAB
  assert [p.name for p in workdir.iterdir()] == ["tokenizer.model"]  # no temp files left


def test_round_trip_plain_text(trained):
  _, tokenizer = trained
  for sentence in random_sentences(50, seed=1):
    ids = tokenizer.encode(sentence)
    assert tokenizer.decode(ids) == sentence


def test_encode_has_no_specials_and_decode_drops_them(trained):
  _, tokenizer = trained
  text = "the farmer saw a red boat ."
  ids = tokenizer.encode(text)
  assert ids and not {tok.PAD_ID, tok.EOS_ID, tok.BOS_ID} & set(ids)
  assert tokenizer.decode([tok.BOS_ID] + ids + [tok.EOS_ID, tok.PAD_ID, tok.PAD_ID]) == text


def test_unknown_character_maps_to_unk(trained):
  _, tokenizer = trained
  assert tok.UNK_ID in tokenizer.encode("zebra")  # 'z' and 'z'-pieces never seen in training


def test_byte_fallback_reads_every_character_and_splits_digits(tmp_path):
  source = ListSource({"train": random_sentences(2000)})
  tokenizer = tok.load_or_train_tokenizer(tmp_path / "tokenizer.model", source, vocab_size=VOCAB + 256,
                                          sample_sentences=1000, byte_fallback=True)
  text = "zebra 漢字 😀 in 2026"
  ids = tokenizer.encode(text)
  assert tok.UNK_ID not in ids
  assert tokenizer.decode(ids) == text
  assert len(tokenizer.encode("2026")) >= 4  # one piece per digit at least


def test_encode_batch_matches_encode(trained):
  _, tokenizer = trained
  sentences = random_sentences(30, seed=2)
  assert tokenizer.encode_batch(sentences, num_threads=2) == [tokenizer.encode(s)
                                                              for s in sentences]


def test_reuse_does_not_retrain(trained):
  workdir, tokenizer = trained
  mtime = os.stat(tokenizer.path).st_mtime_ns
  source = ListSource({"train": ["different text entirely"]})
  again = tok.load_or_train_tokenizer(workdir / "tokenizer.model", source, vocab_size=VOCAB)
  assert source.reads == 0
  assert os.stat(again.path).st_mtime_ns == mtime
  assert again.model_bytes() == tokenizer.model_bytes()


def test_sample_limit_is_respected(tmp_path):
  good = random_sentences(300)
  # Sentences past the sample contain characters that would otherwise enter the vocabulary.
  source = ListSource({"train": good + ["QQQQ XXXX ZZZZ"] * 300})
  tokenizer = tok.load_or_train_tokenizer(tmp_path / "t.model", source, vocab_size=40,
                                        sample_sentences=300)
  assert tok.UNK_ID in tokenizer.encode("Q")


def test_missing_model_error_names_path(tmp_path):
  path = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok.load_tokenizer(path)


def test_corrupt_model_error_names_path(tmp_path):
  path = tmp_path / "bad.model"
  path.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(ValueError, match="bad.model") as info:
    tok.load_tokenizer(path)
  assert "\n" not in str(info.value)


def test_vocab_too_large_is_one_line_error_and_writes_nothing(tmp_path):
  source = ListSource({"train": ["a b c", "b c a"] * 10})
  with pytest.raises(ValueError, match="smaller vocab_size"):
    tok.load_or_train_tokenizer(tmp_path / "t.model", source, vocab_size=5000)
  assert list(tmp_path.iterdir()) == []
