"""Tests for lm1b/input_pipeline.py on small plain-text files selected through gin."""

import gin
import numpy as np
import pytest

from lm1b import batches, input_pipeline
from tests.fake_source import random_sentences


@pytest.fixture
def text_source(tmp_path, monkeypatch):
  monkeypatch.setenv("HLM1B_DATA_ROOT", str(tmp_path / "root"))
  (tmp_path / "train.txt").write_text("\n".join(random_sentences(400, seed=8)) + "\n")
  (tmp_path / "test.txt").write_text("\n".join(random_sentences(30, seed=9)) + "\n")
  gin.clear_config()
  gin.parse_config([
      "make_source.kind = 'text'",
      f"make_source.train_glob = '{tmp_path / 'train.txt'}'",
      f"make_source.test_glob = '{tmp_path / 'test.txt'}'",
      "load_or_train_tokenizer.vocab_size = 48",
  ])
  yield tmp_path
  gin.clear_config()


def test_build_inputs_end_to_end(text_source):
  workdir = text_source / "work"
  inputs = input_pipeline.build_inputs(workdir, global_batch=4, seq_len=16, mode="packed",
                                       eval_global_batch=6)
  assert (workdir / "tokenizer.model").is_file()
  assert inputs.tokenizer.vocab_size == 48
  assert inputs.seq_len == 16 and inputs.eval_global_batch == 6
  assert isinstance(inputs.source_name, str) and inputs.source_name
  batch = next(inputs.train)
  assert batch["inputs"].shape == (4, 16) and batch["weights"].sum() > 0
  test = inputs.eval_split("test")
  assert len(test) == 30
  assert inputs.eval_split("test") is test  # loaded once
  text = (text_source / "test.txt").read_text().splitlines()
  assert inputs.tokenizer.decode(test.sentence(0).tolist()) == text[0]
  evals = list(batches.eval_batches(test, global_batch=6, seq_len=16))
  assert sum(float(b["words"].sum()) for b in evals) == sum(len(s.split()) + 1 for s in text)
  caches = list((text_source / "root" / "token_cache").iterdir())
  assert len(caches) == 2  # train and test

  again = input_pipeline.build_inputs(workdir, global_batch=4, seq_len=16, mode="packed")
  assert again.train.state() == {"epoch": 0, "cursor": 0, "seed": 0}
  np.testing.assert_array_equal(next(again.train)["inputs"], batch["inputs"])


def test_two_processes_share_the_global_batch(text_source):
  workdir = text_source / "work"
  whole = input_pipeline.build_inputs(workdir, global_batch=4, seq_len=16)
  halves = [input_pipeline.build_inputs(workdir, global_batch=4, seq_len=16, process_index=p,
                                        process_count=2) for p in range(2)]
  want = next(whole.train)
  got = [next(h.train) for h in halves]
  np.testing.assert_array_equal(np.concatenate([g["targets"] for g in got]), want["targets"])


def test_global_batch_must_divide_by_process_count(text_source):
  with pytest.raises(ValueError, match="global_batch=6"):
    input_pipeline.build_inputs(text_source / "work", global_batch=6, process_index=0,
                                process_count=4)
  with pytest.raises(ValueError, match="eval_global_batch"):
    input_pipeline.build_inputs(text_source / "work", global_batch=4, eval_global_batch=3,
                                process_index=0, process_count=2)
