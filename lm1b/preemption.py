"""SIGTERM/SIGINT (a TPU preemption, Ctrl-C): stop at a clean point, every process alike.

`StopRequest` is installed when a run opens its workdir. While preparing data, compiling or
restoring (`immediate` phase) a signal raises StopSignal at once: nothing half-written is kept
(token caches and checkpoints are written through temporary paths). Inside `deferred()` (the
training loop, the final save and evaluation) it only sets a flag that the loop reads at
agreed points: with one process at every step, with several processes at steps that are
multiples of `check_every`, where they all-gather their flags so that all stop at the same
step. The check is the only host synchronisation it adds, once every `check_every` steps.
A second SIGINT raises KeyboardInterrupt.
"""

import contextlib
import logging
import signal
import threading
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

_LOG = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal(Exception):
  """A stop signal arrived outside the training loop; the run unwinds and exits."""

  def __init__(self, signal_name: str):
    super().__init__(f"{signal_name} received")
    self.signal_name = signal_name


class StopRequest:
  """Signal handler (main thread only) and the agreed stop decision; a context manager."""

  def __init__(self, check_every: int = 10):
    if check_every < 1:
      raise ValueError(f"check_every={check_every} must be >= 1")
    self.check_every = check_every
    self.signal_name: str | None = None
    self._deferred = False
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = name
    if not self._deferred:
      raise StopSignal(name)
    _LOG.warning("%s received: stopping at the next agreed point", name)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Signals inside only set the flag (a signal that came before raises now)."""
    if self.signal_name is not None and not self._deferred:
      raise StopSignal(self.signal_name)
    self._deferred = True
    try:
      yield
    finally:
      self._deferred = False

  def _agreed(self) -> bool:
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.max(flags))

  def requested_at(self, step: int) -> bool:
    """Whether to stop after `step`; with several processes decided every check_every steps."""
    if jax.process_count() > 1 and step % self.check_every:
      return False
    return self._agreed()

  def requested_now(self) -> bool:
    """Whether to stop now (outside the step loop; agreed across processes on every call)."""
    return self._agreed()
