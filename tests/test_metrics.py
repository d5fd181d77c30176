"""Tests for lm1b.metrics: TensorBoard files read back with tensorboard's reader, console
line, perplexities."""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from lm1b import metrics


def _load(logdir):
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator


def test_scalars_and_text_read_back(tmp_path):
  with metrics.MetricWriter(tmp_path / "tb") as writer:
    writer.scalars(1, {"train/loss": 3.5, "train/lr": np.float32(1e-3)})
    writer.scalars(2, {"train/loss": jnp.asarray(2.25)})
    writer.text(2, "samples", "the cat sat")
    writer.flush()
  tags = _load(tmp_path / "tb").Tags()
  assert set(tags["scalars"]) == {"train/loss", "train/lr"}
  accumulator = _load(tmp_path / "tb")
  loss = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
  assert loss == [(1, 3.5), (2, 2.25)]
  assert accumulator.Scalars("train/lr")[0].value == pytest.approx(1e-3)
  assert "samples" in tags["tensors"]
  (event,) = accumulator.Tensors("samples")
  assert event.step == 2 and event.tensor_proto.string_val == [b"the cat sat"]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(tmp_path / "off", enabled=False)
  writer.scalars(1, {"x": 1.0})
  writer.text(1, "t", "x")
  writer.close()
  assert not os.path.exists(tmp_path / "off")


def test_perplexity():
  assert metrics.perplexity(0.0) == 1.0
  assert metrics.perplexity(math.log(30.0)) == pytest.approx(30.0)
  assert metrics.perplexity(1e6) == math.inf
  assert math.isnan(metrics.perplexity(float("nan")))


def test_unigram_perplexity():
  assert metrics.unigram_perplexity([5, 5, 5, 5, 0]) == pytest.approx(4.0)
  counts = np.array([1, 3])
  p = counts / 4
  assert metrics.unigram_perplexity(counts) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  assert metrics.unigram_perplexity({"a": 2, "b": 2}) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="total"):
    metrics.unigram_perplexity([0, 0])


def test_progress_line():
  line = metrics.format_progress(
      1200, 10000, {"loss": 3.4, "learning_rate": 1e-3, "tokens_per_sec": 45_200.0,
                    "fill": 0.871, "mfu_real_tokens": 0.312, "mfu_all_slots": 0.358,
                    "steps_per_sec": 2.0})
  assert line.startswith("step 1200/10000")
  assert "loss 3.4000" in line and f"ppl {math.exp(3.4):.2f}" in line
  assert "lr 1.00e-03" in line and "45.2k tok/s (fill 87%)" in line
  assert "MFU 31.2% real, 35.8% slots" in line and "2.00 step/s" in line
  assert line.endswith("ETA 1:13:20")  # 8800 steps at 2 steps/s
  bare = metrics.format_progress(5, 10, {"tokens_per_sec": 10.0})
  assert "ETA ?" in bare and "fill" not in bare and "MFU" not in bare


def test_format_duration():
  assert metrics.format_duration(3725) == "1:02:05"
  assert metrics.format_duration(float("inf")) == "?"
