"""Tests of lm1b/workdir.py (the run directory's files, atomic result files) and of the resume
check of lm1b/run_config.py that compares config.gin with the run's configuration."""

import gin
import pytest

from lm1b import cli, run_config, workdir
from lm1b.errors import ConfigError

BINDINGS = ["ModelConfig.d_model = 32", "ModelConfig.num_heads = 2",
            "train_and_evaluate.num_steps = 4", "train_and_evaluate.sample_prompts = ('a', 'b')"]


def _config(*changes: str) -> run_config.RunConfig:
  cli.parse_gin([], BINDINGS + list(changes))
  return run_config.build()


def test_workdir_names_every_file_of_a_run(tmp_path):
  run = workdir.Workdir(tmp_path)
  assert [p.relative_to(tmp_path).as_posix() for p in (
      run.config, run.tokenizer, run.checkpoints, run.quarantine, run.tensorboard, run.lock,
      run.eval_json("test", 7))] == [
          "config.gin", "tokenizer.model", "checkpoints", "checkpoints/corrupt", "tensorboard",
          "train.lock", "eval_test_7.json"]
  assert workdir.Workdir("gs://bucket/run").config.as_posix() == "gs://bucket/run/config.gin"
  assert not list(tmp_path.iterdir())  # naming creates nothing


def test_resume_check_allows_loop_and_mesh_changes_but_not_model_changes(tmp_path):
  run = workdir.Workdir(tmp_path)
  config = _config()
  run_config.check_resume(run, config)  # no config.gin yet
  run.write_config(config.text)
  assert run.read_config() == config.text
  run_config.check_resume(run, _config("train_and_evaluate.num_steps = 8",
                                       "make_mesh.data = 1"))
  with pytest.raises(ConfigError, match=r"config\.gin .*ModelConfig\.d_model"):
    run_config.check_resume(run, _config("ModelConfig.d_model = 64"))
  with pytest.raises(ConfigError, match=r"config\.gin .*make_schedule\.learning_rate"):
    run_config.check_resume(run, _config("make_schedule.learning_rate = 0.5"))
  # A binding that states a default is the same configuration.
  run_config.check_resume(run, _config("ModelConfig.dropout_rate = 0.1"))
  # Rematerialisation and the attention kernel change how a step runs, not its parameters.
  run_config.check_resume(run, _config('ModelConfig.remat = "full"'))
  with pytest.raises(ConfigError, match=r"config\.gin .*ModelConfig\.scan_layers"):
    run_config.check_resume(run, _config("ModelConfig.scan_layers = True"))


def test_reading_a_saved_configuration_keeps_the_parsed_bindings():
  config = _config("ModelConfig.d_model = 64")
  saved = _config().text
  cli.parse_gin([], BINDINGS + ["ModelConfig.d_model = 64"])
  before = gin.config_str()
  assert run_config.from_text(saved, "a copy").model.d_model == 32
  assert gin.config_str() == before and run_config.build() == config
  with pytest.raises(ConfigError, match="the configuration in a copy cannot be read"):
    run_config.from_text("ModelConfig.no_such_field = 1\n", "a copy")
  assert gin.config_str() == before


def test_write_json_is_atomic_and_readable(tmp_path):
  path = workdir.write_json(workdir.Workdir(tmp_path).eval_json("test", 1), {"loss": 1.5})
  assert open(path, encoding="utf-8").read().strip() == '{\n  "loss": 1.5\n}'
  assert [p.name for p in tmp_path.iterdir()] == ["eval_test_1.json"]
