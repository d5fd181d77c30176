"""The one source of randomness of the embedded corpus: a seeded stream of uniform floats."""

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

_BLOCK = 1 << 16  # floats drawn from numpy at a time

T = TypeVar("T")


class Draws:
  """Uniform floats in [0, 1) from `np.random.default_rng(seed)`, and choices made with them.

  The floats are drawn from numpy in blocks and consumed in plain Python, which keeps the
  grammar fast (about 11 microseconds a sentence) and bit-for-bit deterministic: every choice
  of the corpus consumes this stream in a fixed order, so the same seed gives the same bytes on
  every machine.
  """

  def __init__(self, seed: tuple[int, ...]):
    rng = np.random.default_rng(seed)

    def stream():
      while True:
        yield from rng.random(_BLOCK).tolist()

    self.uniform = stream().__next__  # () -> float in [0, 1), the next of the stream

  def pick(self, items: Sequence[T]) -> T:
    """A uniform choice from `items` (one draw)."""
    return items[int(self.uniform() * len(items))]

  def zipf(self, items: Sequence[T]) -> T:
    """A skewed choice: earlier items are more frequent (P(index < k) = sqrt(k / n))."""
    u = self.uniform()
    return items[int(u * u * len(items))]

  def distinct(self, items: Sequence[T], count: int) -> list[T]:
    """`count` (at most len(items)) different items, in the order picked."""
    chosen = []
    while len(chosen) < min(count, len(items)):
      item = self.pick(items)
      if item not in chosen:
        chosen.append(item)
    return chosen
