"""Tests of lm1b/loop.py's periodic actions, lm1b/loop_config.py and lm1b/train_metrics.py
(the metrics window and the finite-loss check); the loop itself runs in test_train.py."""

import math

import numpy as np
import pytest

from lm1b import loop, run_config
from lm1b.errors import ConfigError
from lm1b.loop_config import LoopConfig
from lm1b.train_metrics import MetricsWindow, NonFiniteLossError


def _steps(action, last: int = 12) -> list[int]:
  return [step for step in range(1, last + 1) if action.should_run(step)]


def test_actions_say_when_they_are_due():
  assert _steps(loop.LogMetrics(every=5, num_steps=12)) == [5, 10, 12]  # and the last step
  assert _steps(loop.LogMetrics(every=0, num_steps=12)) == [12]
  assert _steps(loop.Evaluate(every=4, num_steps=12, max_batches=1)) == [4, 8]  # not the last
  assert _steps(loop.Evaluate(every=0, num_steps=12, max_batches=1)) == []
  assert _steps(loop.Sample(every=6, prompts=("a",), max_length=8, seed=0)) == [6, 12]


def test_loop_config_checks_its_knobs_and_the_command_line_names_the_binding():
  assert LoopConfig(num_steps=3, sample_prompts=["a", "b"]).sample_prompts == ("a", "b")
  with pytest.raises(ConfigError, match="num_steps=0 must be a positive int") as error:
    LoopConfig(num_steps=0)
  assert run_config.describe_error(error.value).startswith("train_and_evaluate.num_steps=0")
  with pytest.raises(ConfigError, match="log_every=True must be an int >= 0"):
    LoopConfig(num_steps=3, log_every=True)
  with pytest.raises(ConfigError, match="label_smoothing=1.0"):
    LoopConfig(num_steps=3, label_smoothing=1.0)


def _metrics(loss_sum: float, weight_sum: float = 2.0, finite: bool = True) -> dict:
  return {"loss_sum": np.float32(loss_sum), "weight_sum": np.float32(weight_sum),
          "nll_sum": np.float32(loss_sum), "grad_norm": np.float32(0.5),
          "learning_rate": np.float32(0.01), "finite": np.bool_(finite)}


def test_metrics_window_averages_a_window_and_keeps_every_loss():
  window = MetricsWindow()
  assert window.close() is None
  window.add(1, _metrics(4.0))
  window.add(2, _metrics(2.0))
  window.drain(lambda: "none")
  values = window.close()
  assert values["loss"] == pytest.approx(1.5) and values["real_tokens"] == 4.0
  assert values["per_token_perplexity"] == pytest.approx(math.exp(1.5))
  assert values["grad_norm"] == pytest.approx(0.5) and window.losses == {1: 2.0, 2: 1.0}
  assert window.close() is None  # the next window starts empty


@pytest.mark.parametrize("bad", [_metrics(float("nan")), _metrics(1.0, finite=False)])
def test_metrics_window_names_the_first_non_finite_step(bad):
  window = MetricsWindow()
  window.add(7, _metrics(1.0))
  window.add(8, bad)
  with pytest.raises(NonFiniteLossError, match="at step 8; .*last checkpoint: step 5"):
    window.drain(lambda: "step 5")
  assert window.losses == {7: 0.5}
