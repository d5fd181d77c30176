"""TensorBoard event files, the console progress line and perplexity helpers.

Event files are written with tensorboard's own EventFileWriter and summary protos, so no
TensorFlow is needed. Scalars are stored as `simple_value` summaries, text as tensors with
the text plugin's metadata (what TensorBoard's scalar and text dashboards read).

Resuming: a run resumed from step S redoes the steps after S, whose summaries an earlier
process may already have written. TensorBoard's two readers treat that differently: the
Python EventAccumulator (`--load_fast=false`) purges data with step > S when it meets a
`SessionLog(status=START)` event at step S + 1, while the Rust data server (the default)
ignores SessionLog and only drops, per tag, points whose step is not below a newly read
point, so orphaned points of tags that are not written again stay. `MetricWriter(...,
resume_step=S)` therefore rewrites the existing event files without their events after S
(each file replaced atomically, keeping its name and order) and then writes the START event
for readers that already loaded the old files.

The logdir may be local or gs:// (lm1b.storage). Locally, tensorboard's EventFileWriter
appends to the event file. An object cannot be appended to, and tensorboard's file layer
without TensorFlow would overwrite a gs:// event file with each flushed chunk through gcsfs:
there `ObjectEventFile` keeps the file's records in memory and uploads the whole object at
every flush. Event files are read with tensorboard's loader (TensorFlow's gfile if installed,
else its stub, which reaches gs:// through fsspec), listed and rewritten through etils.epath.
"""

import functools
import io
import itertools
import logging
import math
import os
import socket
import threading
import time
from typing import Mapping

import numpy as np
from etils import epath
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import event_file_writer
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.summary.writer.record_writer import RecordWriter

from lm1b import storage

_LOG = logging.getLogger(__name__)
EVENT_FILE_MARK = "tfevents"  # what TensorBoard looks for in an event file's name


def event_files(logdir: epath.PathLike) -> list[str]:
  """The event files directly in `logdir`, in TensorBoard's (lexicographic) reading order."""
  logdir = epath.Path(logdir)
  if not logdir.is_dir():
    return []
  return sorted(str(path) for path in logdir.iterdir()
                if EVENT_FILE_MARK in path.name and path.is_file())


def drop_events_after(path: str, step: int) -> int:
  """Rewrites the event file `path` without its events whose step is > `step`.

  The file is replaced atomically (lm1b.storage.write_bytes_atomic) and only if something is
  dropped. Bytes that cannot be read as records (a garbled record, a truncated last one) end
  the readable part: the whole file is first kept under its name with "tfevents" replaced by
  "damaged" (TensorBoard does not read it), with one warning line, so that no history is lost
  silently. Returns the number of events dropped.
  """
  records = list(event_file_loader.RawEventFileLoader(path).Load())
  kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
  size, readable = epath.Path(path).stat().length, sum(len(r) + 16 for r in records)
  if len(kept) == len(records) and size == readable:
    return 0
  if size != readable:
    original = epath.Path(path)  # a name without "tfevents": TensorBoard must not read it
    copy = _free_name(original.with_name(original.name.replace(EVENT_FILE_MARK, "damaged")))
    epath.Path(path).copy(copy)
    _LOG.warning("event file %s is unreadable after byte %d of %d (%d records read); kept as "
                 "%s, continuing with the records before", path, readable, size, len(records),
                 copy)
  buffer = io.BytesIO()
  writer = RecordWriter(buffer)
  for record in kept:
    writer.write(record)
  storage.write_bytes_atomic(path, buffer.getvalue())
  return len(records) - len(kept)


def _free_name(path: epath.Path) -> epath.Path:
  """`path`, or `path`-1, -2, ... if taken."""
  candidate, index = path, 0
  while candidate.exists():
    index += 1
    candidate = path.with_name(f"{path.name}-{index}")
  return candidate


_MAX_LOG = math.log(np.finfo(np.float64).max)
_FILE_NUMBERS = itertools.count()


class ObjectEventFile:
  """An event file on an object store, rewritten whole (atomically) at every flush.

  Named like EventFileWriter's files (events.out.tfevents.<time>.<host>.<pid>.<n>) and with
  the same first event; flushes when an event arrives `flush_secs` after the last flush, on
  flush() and on close(). Holds the whole file in memory (scalars and samples: kilobytes to
  a few megabytes for a long run).
  """

  def __init__(self, logdir: epath.PathLike, flush_secs: float):
    name = "events.out.%s.%010d.%s.%d.%d" % (EVENT_FILE_MARK, time.time(), socket.gethostname(),
                                             os.getpid(), next(_FILE_NUMBERS))
    self.path = epath.Path(logdir) / name
    self.flush_secs = flush_secs
    self._records = io.BytesIO()
    self._record_writer = RecordWriter(self._records)
    self._last_flush = time.monotonic()
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def add_event(self, event: event_pb2.Event) -> None:
    self._record_writer.write(event.SerializeToString())
    if time.monotonic() - self._last_flush >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    storage.write_bytes_atomic(self.path, self._records.getvalue())
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()


class MetricWriter:
  """Writes scalar and text summaries to `logdir`; a no-op when `enabled` is False.

  Callers pass enabled=lm1b.chief.is_chief() so that only one process writes.
  resume_step: the step the run continues from (0 for a fresh start) when earlier processes
  may have written to `logdir`: their events after it are removed (see the module
  docstring); None leaves existing files alone.

  Metrics are not worth a run: a failed write (a full or unwritable disk, in the writer's
  thread or here) is logged once and never raised; the next write retries with a new event
  file, and the events queued in the failed one are lost.
  """

  def __init__(self, logdir: epath.PathLike, *, enabled: bool = True,
               resume_step: int | None = None):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._writer = None
    self._failed = False  # the last write failed: the next one opens a new file
    self._warned = False
    if not enabled:
      return
    if resume_step is not None:
      for path in event_files(self.logdir):
        drop_events_after(path, resume_step)
    self._guarded(self._open)
    if resume_step is not None:
      self._add(event_pb2.Event(
          wall_time=time.time(), step=resume_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _open(self) -> None:
    _quiet_writer_threads()
    self._writer = (ObjectEventFile(self.logdir, flush_secs=30)
                    if storage.is_remote(self.logdir)
                    else EventFileWriter(self.logdir, flush_secs=30))

  def _guarded(self, action) -> None:
    """Runs a write; a failure is logged (the first one only) and leaves the writer closed."""
    try:
      action()
      self._failed = False
    except Exception as error:  # pylint: disable=broad-except
      self._failed = True
      if not self._warned:
        self._warned = True
        _LOG.warning("TensorBoard write to %s failed (%s: %s); training goes on, metrics are "
                     "retried at the next write (said once)", self.logdir,
                     type(error).__name__, error)
      writer, self._writer = self._writer, None
      if writer is not None:
        try:
          writer.close()
        except Exception:  # pylint: disable=broad-except
          pass

  def _add(self, event: event_pb2.Event) -> None:
    def add():
      if self._writer is None:
        self._open()
      self._writer.add_event(event)
    if self.enabled:
      self._guarded(add)

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One scalar per tag; values may be Python, numpy or 0-d jax numbers."""
    if not self.enabled:
      return
    summary = summary_pb2.Summary()
    for tag, value in values.items():
      summary.value.add(tag=tag, simple_value=float(np.asarray(value)))
    self._write(step, summary)

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._write(step, text_summary.text_pb(tag, text))

  def flush(self) -> None:
    if self.enabled and self._writer is not None:
      self._guarded(self._writer.flush)

  def close(self) -> None:
    """Flushes and closes; later writes are no-ops."""
    if self.enabled and self._writer is not None:
      self._guarded(self._writer.close)
    self._writer, self.enabled = None, False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@functools.cache
def _quiet_writer_threads() -> None:
  """tensorboard's writer thread re-raises its failure, which threading prints as a
  traceback; MetricWriter reports it in one line instead (once per process)."""
  previous = threading.excepthook

  def hook(args):
    if not isinstance(args.thread, event_file_writer._AsyncWriterThread):  # pylint: disable=protected-access
      previous(args)

  threading.excepthook = hook


def perplexity(loss: float) -> float:
  """exp(loss) for a mean NLL in nats; inf instead of an overflow, nan stays nan."""
  loss = float(loss)
  if math.isnan(loss):
    return math.nan
  return math.exp(loss) if loss < _MAX_LOG else math.inf


def unigram_perplexity(token_counts) -> float:
  """Perplexity of the maximum-likelihood unigram model on the counted tokens.

  token_counts: [V] array-like of non-negative counts (or a mapping token -> count);
  returns exp(-sum_v p_v log p_v) with p_v = count_v / total.
  """
  if isinstance(token_counts, Mapping):
    token_counts = list(token_counts.values())
  counts = np.asarray(token_counts, dtype=np.float64).ravel()
  if (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(f"token_counts must be non-negative with a positive total, "
                     f"got total {counts.sum()}")
  probs = counts[counts > 0] / counts.sum()
  return float(np.exp(-(probs * np.log(probs)).sum()))


def format_duration(seconds: float) -> str:
  """h:mm:ss ('?' when unknown)."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def _si(value: float) -> str:
  for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= factor:
      return f"{value / factor:.1f}{suffix}"
  return f"{value:.0f}"


def format_progress(step: int, total_steps: int, metrics: Mapping[str, float]) -> str:
  """One console line, e.g.
  'step 1200/10000 12.0% | loss 3.4120 | ppl 30.30 | lr 1.00e-03 | 45.2k tok/s (fill 87%)
  | MFU 31.2% real, 35.9% slots | 2.15 step/s | ETA 1:08:12'.

  metrics keys used when present: loss, per_token_perplexity (else exp(loss)),
  learning_rate, tokens_per_sec (real tokens), fill, mfu_real_tokens and mfu_all_slots
  (fractions), steps_per_sec (the ETA is unknown without it).
  """
  parts = [f"step {step}/{total_steps} {100.0 * step / max(total_steps, 1):.1f}%"]
  if "loss" in metrics:
    loss = float(metrics["loss"])
    parts.append(f"loss {loss:.4f}")
    parts.append(f"ppl {float(metrics.get('per_token_perplexity', perplexity(loss))):.2f}")
  if "learning_rate" in metrics:
    parts.append(f"lr {float(metrics['learning_rate']):.2e}")
  if "tokens_per_sec" in metrics:
    fill = f" (fill {100.0 * float(metrics['fill']):.0f}%)" if "fill" in metrics else ""
    parts.append(f"{_si(float(metrics['tokens_per_sec']))} tok/s{fill}")
  if "mfu_real_tokens" in metrics and "mfu_all_slots" in metrics:
    parts.append(f"MFU {100.0 * float(metrics['mfu_real_tokens']):.1f}% real, "
                 f"{100.0 * float(metrics['mfu_all_slots']):.1f}% slots")
  steps_per_sec = float(metrics.get("steps_per_sec", 0.0))
  if steps_per_sec > 0:
    parts.append(f"{steps_per_sec:.2f} step/s")
  remaining = (total_steps - step) / steps_per_sec if steps_per_sec > 0 else math.inf
  parts.append(f"ETA {format_duration(remaining)}")
  return " | ".join(parts)
