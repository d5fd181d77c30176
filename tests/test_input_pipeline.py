"""Tests for lm1b/input_pipeline.py on small plain-text files selected through gin
(lm1b.run_config)."""

import shutil
import threading

import gin
import numpy as np
import pytest

from lm1b import batches, input_pipeline, run_config
from lm1b.errors import ConfigError
from lm1b.workdir import Workdir
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
      "train_and_evaluate.num_steps = 1",
  ])
  yield tmp_path
  gin.clear_config()


def _source(**kwargs):
  """The gin-configured source (the fixture's text files)."""
  return run_config.build().source(**kwargs)


def _prepare(workdir, source, splits, **kwargs):
  """prepare_data with the workdir's tokenizer path and the gin-configured tokenizer."""
  return input_pipeline.prepare_data(Workdir(workdir).tokenizer, source, splits,
                                     train_tokenizer=run_config.build().tokenizer, **kwargs)


def _train(split, config, *, process_index, process_count):
  return input_pipeline.train_batches(split, config, slot=batches.contiguous_slot,
                                      process_index=process_index, process_count=process_count)


def _eval(split, config, *, process_index, process_count):
  return input_pipeline.eval_batches(split, config, slot=batches.contiguous_slot,
                                     process_index=process_index, process_count=process_count)


def test_prepare_data_then_batches(text_source):
  workdir = text_source / "work"
  data = _prepare(workdir, _source(), ("train", "test"))
  assert (workdir / "tokenizer.model").is_file()
  assert data.tokenizer.vocab_size == 48
  assert len(data.splits["test"]) == 30 and len(data.splits["train"]) == 400
  assert data.descriptions["test"].endswith("test.txt (30 sentences)")
  caches = list((text_source / "root" / "token_cache").iterdir())
  assert len(caches) == 2  # train and test, built before any batch
  text = (text_source / "test.txt").read_text().splitlines()
  assert data.tokenizer.decode(data.splits["test"].sentence(0).tolist()) == text[0]

  config = input_pipeline.InputConfig(global_batch=4, seq_len=16, mode="packed",
                                      eval_global_batch=6)
  train = _train(data.splits["train"], config, process_index=0,
                                       process_count=1)
  batch = next(train)
  assert batch["inputs"].shape == (4, 16) and batch["weights"].sum() > 0
  evals = list(_eval(data.splits["test"], config, process_index=0,
                                           process_count=1))
  assert all(b["inputs"].shape == (6, 16) for b in evals)
  assert sum(float(b["words"].sum()) for b in evals) == sum(len(s.split()) + 1 for s in text)

  again = _prepare(workdir, _source(), ("train",))
  assert again.tokenizer.model_bytes() == data.tokenizer.model_bytes()
  train_again = _train(again.splits["train"], config, process_index=0,
                                             process_count=1)
  np.testing.assert_array_equal(next(train_again)["inputs"], batch["inputs"])


def test_only_the_test_split_needs_its_files(text_source):
  data = _prepare(text_source / "work", _source(), ("test",))
  (text_source / "train.txt").unlink()
  shutil.rmtree(text_source / "root" / "token_cache")
  source = _source(splits=("test",))
  test = _prepare(text_source / "work", source, ("test",), tokenizer=data.tokenizer)
  assert len(test.splits["test"]) == 30
  with pytest.raises(FileNotFoundError, match="train glob matches no files"):
    _source()


def test_other_processes_wait_for_the_chiefs_tokenizer(text_source):
  workdir = text_source / "work"
  source = _source()
  waiter = {}
  thread = threading.Thread(target=lambda: waiter.update(
      data=_prepare(workdir, source, ("test",), is_chief=False)))
  thread.start()
  thread.join(timeout=1.5)
  assert thread.is_alive() and not (workdir / "tokenizer.model").exists()  # still waiting
  chief = _prepare(workdir, source, ("test",), is_chief=True)
  thread.join(timeout=30)
  assert not thread.is_alive()
  assert waiter["data"].tokenizer.model_bytes() == chief.tokenizer.model_bytes()


def test_two_processes_share_the_global_batch(text_source):
  data = _prepare(text_source / "work", _source(), ("train",))
  config = input_pipeline.InputConfig(global_batch=4, seq_len=16)
  whole = _train(data.splits["train"], config, process_index=0,
                                       process_count=1)
  halves = [_train(data.splits["train"], config, process_index=p,
                                         process_count=2) for p in range(2)]
  want = next(whole)
  got = [next(h) for h in halves]
  np.testing.assert_array_equal(np.concatenate([g["targets"] for g in got]), want["targets"])


def test_input_config_errors_name_the_field_and_the_command_line_names_the_binding():
  with pytest.raises(ConfigError, match="mode='rows'") as error:
    input_pipeline.InputConfig(mode="rows")
  assert run_config.describe_error(error.value).startswith("build_inputs.mode='rows'")
  with pytest.raises(ConfigError, match="seq_len=0"):
    input_pipeline.InputConfig(seq_len=0)
  config = input_pipeline.InputConfig(global_batch=6, eval_global_batch=8)
  config.check_processes(2)
  with pytest.raises(ConfigError, match="global_batch=6 .* 4 processes") as error:
    config.check_processes(4)
  assert run_config.describe_error(error.value).startswith("build_inputs.global_batch=6")
  with pytest.raises(ConfigError, match="eval_global_batch=8 .* 3 processes"):
    input_pipeline.InputConfig(global_batch=6, eval_global_batch=8).check_processes(3)
  with gin.unlock_config():
    gin.parse_config(["build_inputs.seq_len = 32", "build_inputs.mode = 'packed'",
                      "ModelConfig.max_len = 32", "train_and_evaluate.num_steps = 1"])
  assert run_config.build().inputs == input_pipeline.InputConfig(seq_len=32, mode="packed")
  with gin.unlock_config():
    gin.parse_config(["build_inputs.seq_len = 0"])
  with pytest.raises(ConfigError) as error:
    run_config.build()
  assert run_config.describe_error(error.value).startswith("build_inputs.seq_len=0")
