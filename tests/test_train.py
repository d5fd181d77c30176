"""Tests of lm1b/train.py: exact resume, stop signals at every phase, data preparation.

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

from lm1b import cli, corpus, evaluate, experiment, loop, run_config, train
from lm1b.workdir import Workdir

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
      'make_schedule.decay = "rsqrt"', "make_schedule.warmup_steps = 1",
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
  return train.train_and_evaluate(run_config.build(), Workdir(workdir))


def restored_params(workdir: pathlib.Path) -> dict:
  """The latest checkpoint's parameters (gin must hold the workdir's configuration)."""
  config = run_config.build()
  loaded = experiment.load_trained(Workdir(workdir), config.model, config.mesh())
  return jax.device_get(loaded.params)


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


def _signal_when_called(monkeypatch, owner, name, when=lambda *a, **k: True):
  """Makes owner.name send SIGTERM to this process (once, when `when` says) before running."""
  original = getattr(owner, name)
  sent = []

  def wrapper(*args, **kwargs):
    if not sent and when(*args, **kwargs):
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, wrapper)
  return sent


def test_sigterm_during_the_final_evaluation_abandons_it_with_a_complete_checkpoint(
    micro, tmp_path, monkeypatch, capsys):
  final = lambda self, params, batches, max_batches=None, **kw: max_batches is None
  sent = _signal_when_called(monkeypatch, evaluate.Evaluator, "run", final)
  workdir = tmp_path / "run"
  argv = ["--workdir", str(workdir), *gin_flags(micro_params(micro[0], num_steps=3))]
  assert cli.train_main(argv) == 0
  assert sent
  assert "evaluation at step 3 abandoned (SIGTERM)" in capsys.readouterr().out
  assert (workdir / "checkpoints" / "3").is_dir() and not list(workdir.glob("eval_test_*"))
  assert not list((workdir / "checkpoints").glob("*tmp*"))


def test_sigterm_during_the_final_save_lets_it_finish_and_says_so(micro, tmp_path,
                                                                   monkeypatch, capsys):
  sent = _signal_when_called(monkeypatch, loop, "finish")
  result = run_train(tmp_path, micro_params(micro[0], num_steps=3))
  assert sent and result.stopped_by == "SIGTERM" and result.final_eval is None
  assert result.checkpoint_step == 3 and result.step == 3
  assert ("SIGTERM: saved the final checkpoint at step 3; stopped before the final "
          "evaluation") in capsys.readouterr().out


def test_sigterm_while_preparing_data_unwinds_at_once(micro, tmp_path, monkeypatch, capsys):
  sent = _signal_when_called(monkeypatch, train.input_pipeline, "prepare_data")
  workdir = tmp_path / "fresh"
  argv = ["--workdir", str(workdir), *gin_flags(micro_params(micro[0], num_steps=3))]
  assert cli.train_main(argv) == 128 + signal.SIGTERM  # nothing was saved
  assert sent and "SIGTERM received before the training loop" in capsys.readouterr().out
  assert not workdir.exists()  # created by this run and still empty: removed


def test_prepare_only_builds_the_data_without_devices(micro, tmp_path):
  corpus_dir, data_root = micro
  command = [sys.executable, "train.py", "--prepare_only", "--workdir", str(tmp_path),
             *gin_flags(micro_params(corpus_dir))]
  env = dict(subprocess_env(data_root), JAX_PLATFORMS="no_such_platform")  # any device use fails
  run = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True,
                       timeout=300, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "config.gin").is_file()
  assert re.search(r"train: .*\(3000 sentences\), [\d,]+ tokens ready", run.stdout)
  assert re.search(r"test: .*news.en.heldout-00000-of-00050 \(50 sentences\)", run.stdout)
  assert not (tmp_path / "checkpoints").exists()
