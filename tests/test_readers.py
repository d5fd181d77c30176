"""eval.py and sample.py as readers of a workdir: they never write what the trainer owns
(no cleanup, no directory, no lock) and are safe beside a running trainer."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from lm1b import cli
from lm1b import tokenizer as tok
from test_train import REPO, gin_flags, micro, micro_params, subprocess_env  # noqa: F401

NUM_STEPS = 2
NUM_WATCHED = 24


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """A workdir with checkpoints at steps 1 and 2."""
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  params = micro_params(micro[0], num_steps=NUM_STEPS, checkpoint_every=1)
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 0
  return workdir


def _tree(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of everything under root, directories included."""
  return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0,
                                     p.stat().st_mtime_ns)
          for p in root.rglob("*")}


def _read(workdir: pathlib.Path, out: pathlib.Path) -> tuple[int, int]:
  """Exit codes of one eval.py (result to `out`) and one sample.py on workdir."""
  return (cli.eval_main(["--workdir", str(workdir), "--output", str(out)]),
          cli.sample_main(["--workdir", str(workdir), "--max_length", "8"]))


def test_readers_leave_the_workdir_and_the_trainers_temporary_steps_as_they_are(
    trained, tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  in_progress = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1234"  # a save under way
  (in_progress / "params").mkdir(parents=True)
  before = _tree(workdir)
  assert _read(workdir, tmp_path / "e.json") == (0, 0)
  assert capsys.readouterr().out.count(f"step {NUM_STEPS}") == 2
  assert _tree(workdir) == before


def test_readers_create_no_checkpoint_directory(trained, tmp_path, capsys):
  workdir = tmp_path / "prepared"  # what train.py --prepare_only leaves
  workdir.mkdir()
  for name in ("config.gin", "tokenizer.model"):
    shutil.copy(trained / name, workdir / name)
  assert _read(workdir, tmp_path / "e.json") == (1, 1)
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert errors == [f"error: no checkpoint in {workdir / 'checkpoints'}"] * 2
  assert sorted(p.name for p in workdir.iterdir()) == ["config.gin", "tokenizer.model"]


def _losses(output: str) -> dict[int, str]:
  return dict(re.findall(r"^step (\d+)/\d+ .*?\| loss (\S+)", output, re.MULTILINE))


def test_readers_beside_a_trainer_saving_every_step_change_nothing(micro, tmp_path, capsys):
  """Two identical runs that save every step, one watched by eval.py and sample.py in a loop
  (in this process) from its first checkpoint to its end: both exit 0 with the same losses
  and the same final evaluation."""
  corpus_dir, data_root = micro
  params = micro_params(corpus_dir, num_steps=NUM_WATCHED, checkpoint_every=1, log_every=1)
  runs = {}
  for name in ("alone", "watched"):
    command = [sys.executable, "train.py", "--workdir", str(tmp_path / name),
               *gin_flags(params)]
    runs[name] = subprocess.Popen(command, cwd=REPO, env=subprocess_env(data_root), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  watched = tmp_path / "watched"
  while runs["watched"].poll() is None and not (watched / "checkpoints" / "1").is_dir():
    time.sleep(0.05)
  codes = []
  while runs["watched"].poll() is None:
    codes.append(_read(watched, tmp_path / "e.json"))
  outputs = {name: run.communicate(timeout=300)[0] for name, run in runs.items()}
  for name, run in runs.items():
    assert run.returncode == 0, outputs[name][-3000:]
  captured = capsys.readouterr()
  assert codes and set(codes) == {(0, 0)}, (codes, [
      line for line in captured.err.splitlines() if line.startswith("error")])
  read_steps = [int(s) for s in re.findall(r"^# step (\d+),", captured.out, re.MULTILINE)]
  assert min(read_steps) < NUM_WATCHED, read_steps  # read while the trainer was saving
  assert _losses(outputs["watched"]) == _losses(outputs["alone"])
  assert len(_losses(outputs["alone"])) == NUM_WATCHED
  assert (json.loads((watched / f"eval_test_{NUM_WATCHED}.json").read_text()) ==
          json.loads((tmp_path / "alone" / f"eval_test_{NUM_WATCHED}.json").read_text()))


def _edit_a_piece(path: pathlib.Path) -> None:
  """One vocabulary entry of a SentencePiece model changed, the file still loadable."""
  data = path.read_bytes()
  tokenizer = tok.load_tokenizer(path)
  pieces = {tokenizer._sp.id_to_piece(i) for i in range(tokenizer.vocab_size)}  # pylint: disable=protected-access
  for piece in sorted(pieces, key=len, reverse=True):
    encoded, edited = piece.encode(), piece[:-1] + "Q"
    if data.count(encoded) == 1 and edited not in pieces and len(edited.encode()) == len(encoded):
      path.write_bytes(data.replace(encoded, edited.encode()))
      return
  raise AssertionError("no piece to edit")


def _error_line(capsys) -> str:
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, errors
  return errors[0]


def test_readers_refuse_a_config_or_tokenizer_that_differs_from_the_checkpoint(
    micro, trained, tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  config = workdir / "config.gin"
  original = config.read_text()
  config.write_text("".join(line for line in original.splitlines(keepends=True)
                            if not line.startswith("ModelConfig.block_size")))
  out = tmp_path / "e.json"
  assert _read(workdir, out) == (2, 2)
  captured = capsys.readouterr().err
  errors = [line for line in captured.splitlines() if line.startswith("error:")]
  assert len(errors) == 2 and not out.exists()
  for line in errors:
    assert f"{config} differs from the copy in checkpoint {workdir}/checkpoints/{NUM_STEPS} " \
           "(in ModelConfig.block_size)" in line and "--accept_mismatch" in line, line
  assert cli.eval_main(["--workdir", str(workdir), "--output", str(out),
                        "--accept_mismatch"]) == 0
  assert "used anyway (--accept_mismatch)" in capsys.readouterr().err and out.exists()
  config.write_text(original)
  _edit_a_piece(workdir / "tokenizer.model")
  assert cli.sample_main(["--workdir", str(workdir), "--max_length", "8"]) == 2
  assert f"{workdir / 'tokenizer.model'} differs from the one checkpoint" in _error_line(capsys)
  params = micro_params(micro[0], num_steps=NUM_STEPS + 1, checkpoint_every=1)
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 2  # no resume
  assert f"{workdir / 'tokenizer.model'} differs from the one checkpoint" in _error_line(capsys)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize("damage, message", [
    (lambda text: text.encode()[:-7], "is truncated (it ends inside the line"),
    (lambda text: b"\xff\xfe" + text.encode(), "is unreadable (not UTF-8"),
])
def test_an_unreadable_config_is_named(micro, trained, tmp_path, capsys, damage, message):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  config = workdir / "config.gin"
  config.write_bytes(damage(config.read_text()))
  params = micro_params(micro[0], num_steps=NUM_STEPS, checkpoint_every=1)
  assert cli.train_main(["--workdir", str(workdir), *gin_flags(params)]) == 2
  assert _error_line(capsys).startswith(f"error: {config} {message}")
  assert cli.eval_main(["--workdir", str(workdir)]) == 2
  assert _error_line(capsys).startswith(f"error: {config} {message}")


def test_a_damaged_token_cache_stops_eval_in_one_line_naming_it(micro, trained, capsys):
  (cache,) = [path for path in (micro[1] / "token_cache").iterdir() if path.is_dir() and
              json.loads((path / "meta.json").read_text())["split"] == "test" and
              json.loads((path / "meta.json").read_text())["tokenizer"] == str(
                  trained / "tokenizer.model")]
  original = (cache / "tokens.bin").read_bytes()
  garbled = bytearray(original)
  garbled[::7] = bytes((b % 200) + 4 for b in garbled[::7])
  try:
    (cache / "tokens.bin").write_bytes(bytes(garbled))
    assert cli.eval_main(["--workdir", str(trained)]) == 1
    assert _error_line(capsys) == (
        f"error: token cache {cache} is damaged: tokens.bin does not match its checksum")
  finally:
    (cache / "tokens.bin").write_bytes(original)


def test_an_eval_result_is_not_replaced_by_a_different_one_silently(trained, tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  path = workdir / f"eval_test_{NUM_STEPS}.json"
  assert cli.eval_main(["--workdir", str(workdir)]) == 0  # the same result: replaced quietly
  assert "held a different result" not in capsys.readouterr().out
  other = dict(json.loads(path.read_text()), loss=1.5)
  path.write_text(json.dumps(other))
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  kept = workdir / f"eval_test_{NUM_STEPS}.replaced-1.json"
  assert f"{path} held a different result (step {NUM_STEPS}, loss 1.5); kept as {kept}" in (
      capsys.readouterr().out)
  assert json.loads(kept.read_text()) == other and json.loads(path.read_text())["loss"] != 1.5


@pytest.mark.parametrize("flags, message", [
    (["--num_samples", "0"], "--num_samples 0 must be >= 1"),
    (["--max_length", "0"], "--max_length 0 must be >= 2"),
    (["--top_p", "0"], "--top_p 0.0 must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--top_k", "5000"], "--top_k 5000 exceeds the vocabulary of 256 pieces"),
    (["--max_length", "99"], "--max_length 99 exceeds the model's max_len 32"),
    (["--prompt", "the " * 40], "tokens with BOS, longer than the model's max_len 32 (the "
                                "default of --max_length)"),
])
def test_sample_flags_out_of_range_are_one_line_exit_2(trained, capsys, flags, message):
  assert cli.sample_main(["--workdir", str(trained), *flags]) == 2
  assert message in _error_line(capsys)


def test_unknown_characters_in_a_prompt_are_warned_about(trained, capsys):
  assert cli.sample_main(["--workdir", str(trained), "--prompt", "the \u732b",
                          "--max_length", "8"]) == 0
  assert "hold characters the tokenizer does not know" in capsys.readouterr().err
