"""TensorBoard event files, the console progress line and perplexity helpers.

Event files are written with tensorboard's own EventFileWriter and summary protos, so no
TensorFlow is needed. Scalars are stored as `simple_value` summaries, text as tensors with
the text plugin's metadata (what TensorBoard's scalar and text dashboards read).
"""

import math
import os
import time
from typing import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_MAX_LOG = math.log(np.finfo(np.float64).max)


class MetricWriter:
  """Writes scalar and text summaries to `logdir`; a no-op when `enabled` is False.

  Callers pass enabled=(jax.process_index() == 0) so that only one process writes.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
    self.logdir = os.fspath(logdir)
    self._writer = EventFileWriter(self.logdir, flush_secs=30) if enabled else None

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    self._writer.add_event(event)

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
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
