"""Tests of lm1b/train.py: exact resume, SIGTERM save, config checks, unigram baseline.

Also home of the micro configuration (a 1-layer d=32 model on a 1% embedded corpus) that
test_cli.py and test_sharded.py import.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm1b import cli, corpus, evaluate, train
from lm1b.token_cache import TokenizedSplit

REPO = pathlib.Path(__file__).resolve().parent.parent


def build_micro_corpus(root: pathlib.Path) -> pathlib.Path:
  """The embedded corpus at 1% scale (3,000 train and 50 test sentences) under root."""
  return corpus.ensure_embedded_corpus(root, scale=0.01)


def micro_params(corpus_dir: pathlib.Path, **loop) -> list[str]:
  """gin bindings (on top of gin/tiny.gin) for a model that compiles and trains in seconds."""
  params = [
      'make_source.kind = "tarball"', f'make_source.path = "{corpus_dir}"',
      "load_or_train_tokenizer.vocab_size = 256",
      "load_or_train_tokenizer.sample_sentences = 3000",
      'load_or_train_tokenizer.model_type = "unigram"',
      "ModelConfig.num_layers = 1", "ModelConfig.num_heads = 2", "ModelConfig.d_model = 32",
      "ModelConfig.d_ff = 64", "ModelConfig.max_len = 32", "ModelConfig.block_size = 8",
      "ModelConfig.dropout_rate = 0.1",
      "build_inputs.seq_len = 32", "build_inputs.global_batch = 8",
      "build_inputs.eval_global_batch = 16",
      'make_schedule.decay = "rsqrt"', "make_schedule.warmup_steps = 2",
      "make_schedule.learning_rate = 0.01",
  ]
  knobs = dict(num_steps=4, log_every=1, eval_every=0, sample_every=0, checkpoint_every=2,
               eval_max_batches=1, sample_max_length=16)
  knobs.update(loop)
  return params + [f"train_and_evaluate.{key} = {value!r}" for key, value in knobs.items()]


def gin_flags(params: list[str]) -> list[str]:
  return [flag for param in params for flag in ("--gin_param", param)]


def subprocess_env(data_root: pathlib.Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", HLM1B_DATA_ROOT=str(data_root),
             PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  """(corpus dir, data root) with HLM1B_DATA_ROOT pointing at the data root."""
  root = tmp_path_factory.mktemp("data")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HLM1B_DATA_ROOT", str(root))
    cli.enable_compilation_cache(None)  # repeated runs of the same programs compile once
    yield build_micro_corpus(root), root


def run_train(workdir: pathlib.Path, params: list[str]) -> train.TrainResult:
  cli.parse_gin([cli.resolve_gin_file(cli.DEFAULT_GIN_FILE)], params)
  return train.train_and_evaluate(str(workdir))


def restored_params(workdir: pathlib.Path) -> dict:
  return jax.device_get(evaluate.load_workdir(str(workdir)).params)


def test_resume_continues_exactly_like_an_uninterrupted_run(micro, tmp_path):
  corpus_dir, _ = micro
  straight = run_train(tmp_path / "straight", micro_params(corpus_dir, num_steps=4))
  first = run_train(tmp_path / "resumed", micro_params(corpus_dir, num_steps=2))
  second = run_train(tmp_path / "resumed", micro_params(corpus_dir, num_steps=4))
  assert sorted(straight.losses) == [1, 2, 3, 4]
  assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4]
  assert {**first.losses, **second.losses} == straight.losses  # bit-identical
  assert straight.losses[4] < straight.losses[1]
  assert second.final_eval["loss"] == straight.final_eval["loss"]
  flat_a = jax.tree.leaves(restored_params(tmp_path / "straight"))
  flat_b = jax.tree.leaves(restored_params(tmp_path / "resumed"))
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b)
  assert (tmp_path / "straight" / "eval_test_4.json").is_file()
  assert straight.unigram_perplexity > 1.0


def test_sigterm_finishes_the_step_saves_and_exits_zero(micro, tmp_path):
  corpus_dir, data_root = micro
  params = micro_params(corpus_dir, num_steps=100000, checkpoint_every=1000)
  command = [sys.executable, "train.py", "--workdir", str(tmp_path), *gin_flags(params)]
  process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(data_root), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if re.match(r"step \d+/100000", line):
      process.send_signal(signal.SIGTERM)
      break
  output = "".join(lines) + process.communicate(timeout=300)[0]
  assert process.returncode == 0, output
  match = re.search(r"SIGTERM: saved checkpoint at step (\d+)", output)
  assert match, output
  step = int(match.group(1))
  assert step >= 1 and (tmp_path / "checkpoints" / str(step)).is_dir()
  assert not list(tmp_path.glob("eval_test_*.json"))  # stopped: no final evaluation


def test_config_check_allows_loop_changes_but_not_model_changes(tmp_path):
  text = ("# Parameters for ModelConfig:\nModelConfig.d_model = 32\nModelConfig.num_heads = 2\n"
          "train_and_evaluate.num_steps = 4\ntrain_and_evaluate.sample_prompts = \\\n"
          "    ('a', 'b')\n")
  train.check_config(str(tmp_path), text)  # no file yet
  (tmp_path / train.CONFIG_FILE).write_text(text)
  train.check_config(str(tmp_path), text.replace("num_steps = 4", "num_steps = 8"))
  with pytest.raises(ValueError, match=r"config\.gin .*ModelConfig\.d_model"):
    train.check_config(str(tmp_path), text.replace("d_model = 32", "d_model = 64"))
  assert train.config_bindings(text)["train_and_evaluate.sample_prompts"] == "\\ ('a', 'b')"


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
  assert train.unigram_test_perplexity(train_split, test_split, vocab) == pytest.approx(expected)
