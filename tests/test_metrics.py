"""Tests for lm1b.metrics: TensorBoard files read back with tensorboard's reader, console
line, perplexities."""

import errno
import logging
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard import context
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer import record_writer
from tensorboard.data import server_ingester
from tensorboard.util import grpc_util

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


def _rustboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} as TensorBoard's default reader (the Rust data server) serves
  them: the server is started on `logdir`, loads it once and is asked over gRPC."""
  ingester = server_ingester.SubprocessServerDataIngester(
      server_ingester.get_server_binary(), str(logdir), reload_interval=0,
      channel_creds_type=grpc_util.ChannelCredsType.LOCAL)
  ingester.start()
  provider, ctx = ingester.data_provider, context.RequestContext()
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:  # --reload=once loads in the background
    runs = provider.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100)
    if runs:
      (tags,) = runs.values()
      return {tag: [(p.step, p.value) for p in points] for tag, points in tags.items()}
    time.sleep(0.05)
  raise TimeoutError(f"the TensorBoard data server served nothing from {logdir}")


def _run_segment(logdir, resume_step, steps, offset):
  """One process of a run: train/loss at `steps` (value step + offset), eval/loss and a text
  sample at multiples of 3."""
  with metrics.MetricWriter(logdir, resume_step=resume_step) as writer:
    for step in steps:
      writer.scalars(step, {"train/loss": step + offset})
      if step % 3 == 0:
        writer.scalars(step, {"eval/loss": step + offset})
        writer.text(step, "samples", f"sample {step + offset}")
  time.sleep(1.01)  # event file names carry the time in seconds


def test_steps_redone_after_a_resume_appear_once_in_both_tensorboard_readers(tmp_path):
  logdir = tmp_path / "tb"
  _run_segment(logdir, 0, [1, 2, 3, 4, 5, 6, 7], 0.0)     # crashes after step 7
  _run_segment(logdir, 3, [4, 5], 100.0)                  # resumed from 3, crashes after 5
  _run_segment(logdir, 3, [4, 5, 6, 7, 8], 200.0)         # resumed from 3 again, finishes
  expected_loss = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 204.0), (5, 205.0), (6, 206.0),
                   (7, 207.0), (8, 208.0)]
  accumulator = _load(logdir)
  assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == expected_loss
  assert [(e.step, e.value) for e in accumulator.Scalars("eval/loss")] == [(3, 3.0), (6, 206.0)]
  assert [e.tensor_proto.string_val for e in accumulator.Tensors("samples")] == [
      [b"sample 3.0"], [b"sample 206.0"]]
  served = _rustboard_scalars(logdir)
  assert served["train/loss"] == expected_loss
  assert served["eval/loss"] == [(3, 3.0), (6, 206.0)]
  assert len(metrics.event_files(str(logdir))) == 3
  assert sorted(os.listdir(logdir)) == sorted(
      os.path.basename(p) for p in metrics.event_files(str(logdir)))  # no temporary files


def test_resume_marks_the_restart_and_leaves_files_alone_without_a_resume_step(tmp_path):
  _run_segment(tmp_path, None, [1, 2, 3], 0.0)
  (first,) = metrics.event_files(str(tmp_path))
  size = os.path.getsize(first)
  _run_segment(tmp_path, None, [2, 3], 100.0)
  assert os.path.getsize(first) == size  # no resume step: nothing is dropped
  with open(first, "ab") as f:
    f.write(b"\x10\x00\x00")  # the torn end of a record (crash mid-write)
  with metrics.MetricWriter(tmp_path, resume_step=1) as writer:
    newest = writer._writer._file_name  # pylint: disable=protected-access
  assert os.path.getsize(first) < size  # steps 2, 3 and the torn record dropped
  events = [event_pb2.Event.FromString(r) for r in
            metrics.event_file_loader.RawEventFileLoader(newest).Load()]
  assert [(e.step, e.session_log.status) for e in events if e.HasField("session_log")] == [
      (2, event_pb2.SessionLog.START)]
  assert [(e.step, e.value) for e in _load(tmp_path).Scalars("train/loss")] == [(1, 1.0)]


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


def test_a_garbled_event_file_is_kept_and_the_resume_says_so(tmp_path, caplog):
  with metrics.MetricWriter(tmp_path) as writer:
    for step in range(1, 9):
      writer.scalars(step, {"train/loss": float(step)})
  (path,) = metrics.event_files(tmp_path)
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 4] = b"\xff\xff\xff\xff"  # one record garbled
  open(path, "wb").write(bytes(data))
  with caplog.at_level(logging.WARNING, logger="lm1b.metrics"):
    metrics.MetricWriter(tmp_path, resume_step=8).close()
  (record,) = [r for r in caplog.records if r.name == "lm1b.metrics"]
  kept = os.path.join(tmp_path, os.path.basename(path).replace("tfevents", "damaged"))
  assert f"event file {path} is unreadable after byte" in record.getMessage()
  assert kept in record.getMessage() and open(kept, "rb").read() == bytes(data)
  assert kept not in metrics.event_files(tmp_path)


def test_failed_writes_are_said_once_retried_and_never_raised(tmp_path, monkeypatch, caplog):
  """The disk fills under the writer's thread (and its flushes); training calls on."""
  failing = [False]
  write = record_writer.RecordWriter.write

  def no_space(self, data):
    if failing[0]:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, data)
  monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
  with caplog.at_level(logging.WARNING, logger="lm1b.metrics"):
    writer = metrics.MetricWriter(tmp_path)
    writer.scalars(1, {"train/loss": 1.0})
    writer.flush()
    failing[0] = True
    for step in range(2, 6):
      writer.scalars(step, {"train/loss": float(step)})
      writer.flush()
    failing[0] = False
    writer.scalars(6, {"train/loss": 6.0})  # the disk has room again: a new file
    writer.close()
  (record,) = [r for r in caplog.records if r.name == "lm1b.metrics"]
  assert "No space left on device" in record.getMessage() and "said once" in record.getMessage()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  steps = {e.step for e in accumulator.Scalars("train/loss")}  # files may sort either way
  assert {1, 6} <= steps and len(metrics.event_files(tmp_path)) >= 2
