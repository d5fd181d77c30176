"""Tests of lm1b/cli.py and the top-level scripts: train -> eval -> sample, gin errors, exit
codes, TensorBoard files, corrupt-checkpoint fallback, and the shipped gin configs."""

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator

from orbax.checkpoint._src.path import atomicity

from benchmarks import long_context
from lm1b import checkpoints, cli, model, run_config, workdir_lock
from test_train import REPO, gin_flags, micro, micro_params, subprocess_env  # noqa: F401

NUM_STEPS = 4


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """A workdir trained through cli.train_main: checkpoints at steps 2 and 4."""
  corpus_dir, _ = micro
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  params = micro_params(corpus_dir, num_steps=NUM_STEPS, eval_every=2, sample_every=2,
                        checkpoint_every=2, peak_flops_per_device=1e11)
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 0
  return workdir


def test_train_writes_the_workdir_layout(trained):
  assert (trained / "config.gin").is_file() and (trained / "tokenizer.model").is_file()
  assert "ModelConfig.d_model = 32" in (trained / "config.gin").read_text()
  assert checkpoints.Checkpointer(trained / "checkpoints").all_steps() == [2, NUM_STEPS]
  result = json.loads((trained / f"eval_test_{NUM_STEPS}.json").read_text())
  assert result["step"] == NUM_STEPS and result["sentences"] == 50
  assert result["per_word_perplexity"] > result["per_token_perplexity"] > 1.0
  assert result["words"] < result["tokens"]


def test_tensorboard_files_are_readable(trained):
  accumulator = event_accumulator.EventAccumulator(
      str(trained / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = accumulator.Tags()["scalars"]
  for tag in ("train/loss", "train/per_token_perplexity", "train/learning_rate",
              "train/grad_norm", "train/tokens_per_sec", "train/step_time_sec", "train/fill",
              "train/mfu_real_tokens", "train/mfu_all_slots",
              "eval/loss", "eval/per_token_perplexity", "eval/per_word_perplexity"):
    assert tag in scalars, tag
  value = lambda tag: {e.step: e.value for e in accumulator.Scalars(tag)}
  fill, real, slots = (value(f"train/{t}") for t in ("fill", "mfu_real_tokens", "mfu_all_slots"))
  for step in fill:  # real-token MFU = all-slot MFU x fill (sentence rows: mostly padding)
    assert 0 < fill[step] < 1 and real[step] == pytest.approx(slots[step] * fill[step], rel=1e-4)
  assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, NUM_STEPS + 1))
  assert [e.step for e in accumulator.Scalars("eval/loss")] == [2, NUM_STEPS]
  assert "samples" in accumulator.Tags()["tensors"], accumulator.Tags()
  samples = accumulator.Tensors("samples")
  assert [e.step for e in samples] == [2, NUM_STEPS]
  assert samples[0].tensor_proto.string_val[0].decode().startswith("the")


def test_eval_scores_the_whole_split_again(trained, capsys):
  final = json.loads((trained / f"eval_test_{NUM_STEPS}.json").read_text())
  (trained / f"eval_test_{NUM_STEPS}.json").unlink()
  assert cli.eval_main(["--workdir", str(trained)]) == 0
  again = json.loads((trained / f"eval_test_{NUM_STEPS}.json").read_text())
  assert again["tokens"] == final["tokens"] and again["words"] == final["words"]
  assert again["loss"] == pytest.approx(final["loss"], rel=1e-6)
  assert "per-token ppl" in capsys.readouterr().out
  for result in (final, again):
    assert result["mode"] == "sentence" and result["split"] == "test"
    assert result["test_set"].endswith("test: news.en.heldout-00000-of-00050 (50 sentences)")
  assert cli.eval_main(["--workdir", str(trained), "--step", "2"]) == 0
  older = json.loads((trained / "eval_test_2.json").read_text())
  assert older["step"] == 2 and older["loss"] > again["loss"]


@pytest.mark.filterwarnings("ignore:hierarchical_attention.*query_mode='mean'")
def test_eval_gin_param_overrides_the_saved_config_into_output(trained, tmp_path, capsys):
  default = trained / f"eval_test_{NUM_STEPS}.json"
  before = default.read_bytes()
  config_before = (trained / "config.gin").read_text()
  assert "ModelConfig.query_mode = 'sample'" in config_before
  out = tmp_path / "mean_queries.json"
  argv = ["--workdir", str(trained), "--output", str(out),
          "--gin_param", "ModelConfig.query_mode = 'mean'"]
  assert cli.eval_main(argv) == 0
  assert str(out) in capsys.readouterr().out
  overridden, own = json.loads(out.read_text()), json.loads(before)
  assert overridden["step"] == own["step"] and overridden["tokens"] == own["tokens"]
  assert abs(overridden["loss"] - own["loss"]) > 1e-4  # other queries, other scores
  assert default.read_bytes() == before
  assert (trained / "config.gin").read_text() == config_before


def test_eval_output_in_a_missing_directory_exits_2(trained, tmp_path, capsys):
  out = tmp_path / "missing" / "result.json"
  assert cli.eval_main(["--workdir", str(trained), "--output", str(out)]) == 2
  error = capsys.readouterr().err
  assert "does not exist" in error and len(error.strip().splitlines()) == 1
  assert not out.parent.exists()


def test_sample_is_batched_and_deterministic_per_seed(trained, capsys):
  argv = ["--workdir", str(trained), "--prompt", "the", "--prompt", "If", "--num_samples", "2",
          "--max_length", "12", "--seed", "3", "--top_k", "20", "--top_p", "0.9"]
  assert cli.sample_main(argv) == 0
  first = capsys.readouterr().out.splitlines()
  assert cli.sample_main(argv) == 0
  assert capsys.readouterr().out.splitlines() == first
  samples = [line for line in first if not line.startswith("#")]
  assert len(samples) == 4
  assert [s.split("]")[0] for s in samples] == ["[the", "[the", "[If", "[If"]
  assert cli.sample_main(["--workdir", str(trained), "--temperature", "0"]) == 0  # max_len
  assert capsys.readouterr().out.splitlines()[1].startswith("[the] the")


@pytest.mark.parametrize("binding, message", [
    ("ModelConfig.num_layer = 2", "num_layer"),
    ("NoSuchThing.value = 1", "NoSuchThing"),
    ("ModelConfig.num_layers = ", "parse"),
])
def test_gin_errors_exit_2_and_write_nothing(tmp_path, capsys, binding, message):
  workdir = tmp_path / "workdir"
  assert cli.train_main(["--workdir", str(workdir), "--gin_param", binding]) == 2
  error = capsys.readouterr().err
  assert message in error and len(error.strip().splitlines()) == 1
  assert not workdir.exists()


def test_missing_gin_file_and_workdir_errors(tmp_path, capsys):
  assert cli.train_main(["--workdir", str(tmp_path / "w"), "--gin_file", "nope.gin"]) == 2
  assert "nope.gin" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()
  assert cli.eval_main(["--workdir", str(tmp_path)]) == 2
  assert "config.gin" in capsys.readouterr().err


def test_different_model_in_an_existing_workdir_is_refused(micro, trained, capsys):
  before = (trained / "config.gin").read_text()
  params = micro_params(micro[0], num_steps=NUM_STEPS, eval_every=2, sample_every=2,
                        checkpoint_every=2)
  argv = ["--workdir", str(trained), *gin_flags(params + ["ModelConfig.d_model = 48"])]
  assert cli.train_main(argv) == 2
  assert re.search(r"config\.gin .*ModelConfig\.d_model", capsys.readouterr().err)
  assert (trained / "config.gin").read_text() == before


def test_readers_say_which_step_they_used_and_why_and_move_nothing(trained, tmp_path,
                                                                     capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  latest = workdir / "checkpoints" / str(NUM_STEPS)
  for path in latest.rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  eval_err = capsys.readouterr().err
  assert cli.sample_main(["--workdir", str(workdir), "--max_length", "8"]) == 0
  sample = capsys.readouterr()
  for err in (eval_err, sample.err):
    (line,) = [line for line in err.splitlines() if " is damaged" in line]
    assert f"checkpoint {latest} is damaged (" in line and "using step 2" in line, line
  assert sample.out.startswith("# step 2,")
  assert json.loads((workdir / "eval_test_2.json").read_text())["step"] == 2
  assert (workdir / f"eval_test_{NUM_STEPS}.json").read_bytes() == (
      trained / f"eval_test_{NUM_STEPS}.json").read_bytes()
  assert latest.is_dir() and not (workdir / "checkpoints" / "corrupt").exists()


def test_nan_loss_exits_1_naming_the_step_and_keeps_good_checkpoints(micro, tmp_path):
  corpus_dir, data_root = micro
  params = micro_params(corpus_dir, num_steps=20, checkpoint_every=1) + [
      "make_schedule.learning_rate = 1e30", "make_schedule.warmup_steps = 0"]
  command = [sys.executable, "train.py", "--workdir", str(tmp_path), *gin_flags(params)]
  run = subprocess.run(command, cwd=REPO, env=subprocess_env(data_root), text=True,
                       capture_output=True, timeout=300, check=False)
  assert run.returncode == 1, run.stdout + run.stderr
  match = re.search(r"non-finite training loss .* at step (\d+)", run.stderr)
  assert match, run.stderr
  bad_step = int(match.group(1))
  steps = checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps()
  assert steps and max(steps) < bad_step


@pytest.mark.parametrize("name, attention, target", [
    ("lm1b_53m.gin", "hierarchical", 53e6), ("lm1b_53m_full.gin", "full", 53e6),
    ("lm1b_144m.gin", "hierarchical", 144e6), ("lm1b_144m_full.gin", "full", 144e6),
    ("lm1b_53m_paper.gin", "hierarchical", 53e6), ("lm1b_53m_full_paper.gin", "full", 53e6),
    ("lm1b_144m_paper.gin", "hierarchical", 144e6),
    ("lm1b_144m_full_paper.gin", "full", 144e6),
    ("lm1b_53m_level_discount.gin", "hierarchical", 53e6),
    ("lm1b_144m_level_discount.gin", "hierarchical", 144e6),
    ("tiny.gin", "hierarchical", None)])
def test_shipped_gin_configs(name, attention, target):
  """The paper's files (and the level-discount fix on top of them): a relative bias
  (hierarchical, or T5 for full attention) as the only position signal; the others: a learned
  position table."""
  cli.parse_gin([cli.resolve_gin_file(f"gin/{name}")], [])
  run = run_config.build()
  config = run.model
  assert config.attention == attention
  paper = name.endswith(("_paper.gin", "_level_discount.gin"))
  assert config.position_encoding == ("none" if paper else "learned")
  assert config.relative_bias == (("t5" if attention == "full" else attention) if paper
                                  else "none")
  discount = name.endswith("_level_discount.gin")
  assert config.relative_bias_per_level == config.relative_bias_level_discount == discount
  assert run.inputs.mode == ("sentence" if target is None else "packed")
  if target is not None:
    assert config.block_size == 16 and config.num_layers == 6
    assert abs(model.count_params(config) - target) <= 0.02 * target


LONG_CONTEXT = sorted(p.stem for p in (REPO / "gin" / "long_context").glob("*.gin")
                      if p.stem != "base")


@pytest.mark.parametrize("name", LONG_CONTEXT)
def test_long_context_configs_are_stream_rows_of_4096_tokens(name):
  cli.parse_gin([cli.resolve_gin_file(f"gin/long_context/{name}.gin")], [])
  run = run_config.build()
  config, inputs = run.model, run.inputs
  assert inputs.mode == "stream" and config.max_len == inputs.seq_len == int(name.split("_")[-1])
  assert inputs.global_batch * inputs.seq_len == max(4096, inputs.seq_len)
  assert config.attention == ("full" if name.startswith("full") else "hierarchical")
  assert config.num_levels == (1 if name.startswith("block_local") else None)
  assert config.position_encoding == "rotary"


def test_long_context_benchmark_applies_gin_params_to_every_config(monkeypatch):
  monkeypatch.setattr(long_context, "GIN_PARAMS", ['ModelConfig.position_encoding = "learned"'])
  for name in ("full_64", "sample_4096"):
    run = long_context.parse(name)
    assert (run.model.position_encoding == "learned"
            and run.inputs.seq_len == int(name.split("_")[-1]))
  monkeypatch.setattr(long_context, "GIN_PARAMS", [])
  assert long_context.parse("full_64").model.position_encoding == "rotary"


def test_stream_rows_train_at_16k_and_evaluate_with_overlapping_windows(micro, tmp_path):
  workdir = tmp_path / "long"
  params = micro_params(micro[0], num_steps=3) + [
      "build_inputs.seq_len = 16384", "ModelConfig.max_len = 16384",
      "build_inputs.global_batch = 1", "build_inputs.eval_global_batch = 1"]
  argv = ["--gin_file", "gin/long_context/sample_16384.gin", "--workdir", str(workdir)]
  assert cli.train_main(argv + gin_flags(params)) == 0
  result = json.loads((workdir / "eval_test_3.json").read_text())
  assert result["mode"] == "stream" and result["sentences"] == 50
  out = tmp_path / "overlap.json"
  assert cli.eval_main(["--workdir", str(workdir), "--output", str(out), "--gin_param",
                        "build_inputs.seq_len = 1024", "--gin_param",
                        "build_inputs.eval_overlap = 512"]) == 0
  overlapped = json.loads(out.read_text())  # same targets and words, other windows
  assert (overlapped["tokens"], overlapped["words"]) == (result["tokens"], result["words"])
  assert overlapped["loss"] != result["loss"]


def one_error_line(stderr: str) -> str:
  """The single 'error: ...' line of stderr (log lines aside); asserts there is no traceback."""
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr
  return errors[0]


def _overwrite_middle(directory: pathlib.Path, count: int = 64) -> None:
  """Overwrites `count` bytes in the middle of the largest file under directory."""
  path = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(path, "r+b") as f:
    f.seek(path.stat().st_size // 2)
    f.write(bytes(range(count)))


def _overwrite_metadata(step_dir: pathlib.Path) -> None:
  """64 bytes of the params item's _METADATA overwritten (no longer UTF-8)."""
  path = step_dir / "params" / "_METADATA"
  with open(path, "r+b") as f:
    f.seek(path.stat().st_size // 2)
    f.write(b"\xff" * 64)


def _flip_ocdbt_data(step_dir: pathlib.Path) -> None:
  """One bit flipped at three places of every OCDBT data file of params (b-tree included)."""
  for path in step_dir.glob("params/**/d/*"):
    size = path.stat().st_size
    with open(path, "r+b") as f:
      for offset in (size // 4, size // 2, 3 * size // 4):
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


# Bytes overwritten in the middle of the largest params file are found by our checksum or,
# where they land in a zstd-compressed chunk, by the decompression when restoring.
@pytest.mark.parametrize("damage, reason", [
    (lambda step_dir: _overwrite_middle(step_dir / "params"),
     ("does not match its checksum", "Data corruption detected")),
    (_overwrite_metadata, ("params metadata: UnicodeDecodeError",)),
    (_flip_ocdbt_data, ("DATA_LOSS",)),
])
def test_damaged_latest_checkpoint_is_moved_aside_and_its_step_saved_again(
    micro, trained, tmp_path, capsys, damage, reason):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  (workdir / f"eval_test_{NUM_STEPS}.json").unlink()
  latest = workdir / "checkpoints" / str(NUM_STEPS)
  damage(latest)
  params = micro_params(micro[0], num_steps=NUM_STEPS, eval_every=2, sample_every=2,
                        checkpoint_every=2, peak_flops_per_device=1e11)
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 0
  captured = capsys.readouterr()
  (line,) = [line for line in (captured.out + captured.err).splitlines()
              if " is damaged" in line]
  assert line.startswith(f"checkpoint {latest} is damaged (") and any(
      why in line for why in reason), line
  assert line.endswith(f"moved to {workdir / 'checkpoints' / 'corrupt' / str(NUM_STEPS)}; "
                       "resuming from step 2"), line
  assert "resumed from" in captured.out and "(step 2)" in captured.out
  assert (workdir / "checkpoints" / "corrupt" / str(NUM_STEPS)).is_dir()  # kept, not deleted
  assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [2, NUM_STEPS]
  assert json.loads((workdir / f"eval_test_{NUM_STEPS}.json").read_text()) == pytest.approx(
      json.loads((trained / f"eval_test_{NUM_STEPS}.json").read_text()))
  assert cli.eval_main(["--workdir", str(workdir), "--output", str(tmp_path / "e.json")]) == 0
  assert json.loads((tmp_path / "e.json").read_text())["step"] == NUM_STEPS
  accumulator = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  accumulator.Reload()  # the replayed steps 3 and 4 appear once
  assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, NUM_STEPS + 1))


def test_second_trainer_on_a_locked_workdir_is_refused(micro, trained, capsys):
  before = sorted(p.name for p in trained.iterdir())
  params = micro_params(micro[0], num_steps=NUM_STEPS + 2)
  with workdir_lock.WorkdirLock(trained):
    assert cli.train_main(["--workdir", str(trained), *gin_flags(params)]) == 1
  error = one_error_line(capsys.readouterr().err)
  assert f"pid {os.getpid()}" in error, error
  assert sorted(p.name for p in trained.iterdir()) == before


def test_shape_mismatch_without_config_names_the_shapes_and_writes_nothing(micro, trained,
                                                                           tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  (workdir / "config.gin").unlink()
  params = micro_params(micro[0], num_steps=NUM_STEPS + 2) + ["ModelConfig.d_model = 48"]
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 2
  error = one_error_line(capsys.readouterr().err)
  assert "attention/out/kernel: saved (2, 16, 32) float32, now (2, 24, 48) float32" in error
  assert not (workdir / "config.gin").exists()


def test_bad_binding_value_exits_2_before_anything_is_written(micro, tmp_path, capsys):
  workdir = tmp_path / "w"
  params = micro_params(micro[0]) + ['ModelConfig.d_model = "big"']
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 2
  assert "ModelConfig.d_model='big'" in capsys.readouterr().err
  assert not workdir.exists()


def test_failed_asynchronous_save_stops_the_run_at_once(micro, tmp_path, monkeypatch, capsys):
  """Step 5's save fails in Orbax's background thread (its final rename); no other step is a
  save step, so without the per-step check the failure would only surface at the final save
  of step 1000."""
  def no_space(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", no_space)
  should_save = checkpoints.Checkpointer.should_save
  monkeypatch.setattr(checkpoints.Checkpointer, "should_save",
                      lambda self, step: step == 5 and should_save(self, step))
  params = micro_params(micro[0], num_steps=1000, checkpoint_every=5, log_every=1)
  assert cli.train_main(["--workdir", str(tmp_path), *gin_flags(params)]) == 1
  captured = capsys.readouterr()
  error = one_error_line(captured.err)
  assert "saving checkpoint step 5" in error and "No space left on device" in error
  last = max(int(m) for m in re.findall(r"^step (\d+)/1000", captured.out, re.MULTILINE))
  assert 5 <= last < 1000
  assert not (tmp_path / "checkpoints" / "5").exists()


@pytest.mark.parametrize("model_binding", [
    "ModelConfig.query_mode = 'sample'", "ModelConfig.query_mode = 'fine'",
    "ModelConfig.attention = 'full'"])
def test_packed_and_sentence_rows_score_the_test_split_alike(trained, tmp_path, model_binding):
  results = {}
  for mode in ("sentence", "packed"):
    out = tmp_path / f"{mode}.json"
    assert cli.eval_main(["--workdir", str(trained), "--output", str(out), "--gin_param",
                          model_binding, "--gin_param", f"build_inputs.mode = '{mode}'"]) == 0
    results[mode] = json.loads(out.read_text())
  sentence, packed = results["sentence"], results["packed"]
  assert packed["mode"] == "packed" and sentence["mode"] == "sentence"
  for key in ("sentences", "tokens", "words"):
    assert packed[key] == sentence[key], key
  for key in ("loss", "per_token_perplexity", "per_word_perplexity"):
    assert packed[key] == pytest.approx(sentence[key], rel=1e-4), key
