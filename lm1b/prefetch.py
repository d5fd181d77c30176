"""Background prefetching: the next items of an iterator are produced while the caller works.

The training loop wraps its batch iterator (host rows -> global device arrays, plus the
data-iterator state after each batch) in `Prefetcher`, so building and transferring batch k + 1
overlaps step k. Exceptions of the producer are raised in the consumer, at the item where they
happened; the end of a finite iterator ends the Prefetcher.
"""

import queue
import threading
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class Prefetcher(Generic[T]):
  """Iterates over `source` with up to `depth` items produced ahead by a daemon thread."""

  def __init__(self, source: Iterator[T], depth: int = 2):
    if depth < 1:
      raise ValueError(f"depth={depth} must be >= 1")
    self._source = source
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Puts `item` unless closed; returns False when closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for item in self._source:
        if not self._put((item, None)):
          return
      self._put((_END, None))
    except BaseException as error:  # pylint: disable=broad-except
      self._put((_END, error))

  def __iter__(self) -> "Prefetcher[T]":
    return self

  def __next__(self) -> T:
    if self._stop.is_set():
      raise StopIteration
    item, error = self._queue.get()
    if item is _END:
      self._stop.set()
      if error is not None:
        raise error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the producer (it finishes the item it is building) and waits for it."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join()

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
