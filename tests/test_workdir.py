"""Tests of lm1b/workdir.py: config.gin comparison and atomic result files."""

import pytest

from lm1b import workdir
from lm1b.errors import ConfigError


def test_config_check_allows_loop_changes_but_not_model_changes(tmp_path):
  text = ("# Parameters for ModelConfig:\nModelConfig.d_model = 32\nModelConfig.num_heads = 2\n"
          "train_and_evaluate.num_steps = 4\ntrain_and_evaluate.sample_prompts = \\\n"
          "    ('a', 'b')\n")
  workdir.check_config(tmp_path, text)  # no file yet
  workdir.write_config(tmp_path, text)
  assert workdir.read_config(tmp_path) == text
  workdir.check_config(tmp_path, text.replace("num_steps = 4", "num_steps = 8"))
  with pytest.raises(ConfigError, match=r"config\.gin .*ModelConfig\.d_model"):
    workdir.check_config(tmp_path, text.replace("d_model = 32", "d_model = 64"))
  assert workdir.config_bindings(text)["train_and_evaluate.sample_prompts"] == "\\ ('a', 'b')"


def test_write_json_is_atomic_and_readable(tmp_path):
  path = workdir.write_json(workdir.eval_json_path(tmp_path, "test", 1), {"loss": 1.5})
  assert open(path, encoding="utf-8").read().strip() == '{\n  "loss": 1.5\n}'
  assert [p.name for p in tmp_path.iterdir()] == ["eval_test_1.json"]
