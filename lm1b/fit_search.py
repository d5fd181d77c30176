"""The largest size that fits in memory, in few measurements.

Every measurement is a compile that takes minutes, and each one reports how many bytes it
needs (even a refused one), not just whether it fits. So instead of bisecting on yes/no, the
search fits needed(n) = fixed + c * n**p through two measurements (the bracket around the
limit once there is one; fixed: the bytes that do not grow with n, e.g. parameters and
optimizer state; p = 1 for the batch, about 1 for hierarchical attention's row length, up to
2 for dense attention's) and jumps to the largest candidate that model says fits. Where the
model is right that is 2-4 measurements. It is not always right: XLA's TPU compiler trades
time for memory as a program nears the chip's size, so the 53M unrolled step needs 14.66 GiB
at 1280 rows and 14.76 at 1408. So a bounded step that fails to halve the bracket is followed
by a bisection step, and the answer is always exact over the candidates, in at most about
twice the measurements of plain bisection.
"""

import bisect as bisect_module
import dataclasses
import math
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Need:
  """One measurement: `needed` bytes per device at size `size`; `fixed` the part known not
  to grow with the size (None if unknown, e.g. for a compile the compiler refused);
  `refused`: the compiler said it does not fit, whatever the bytes."""
  size: int
  needed: int
  available: int
  fixed: int | None = None
  refused: bool = False

  @property
  def fits(self) -> bool:
    return not self.refused and self.needed <= self.available


def _pair(points: list[Need]) -> list[Need]:
  """The measurements to draw the model through: the bracket (largest that fits, smallest
  that does not) when there is one, else the two nearest the unknown side."""
  fitting = sorted((p for p in points if p.fits), key=lambda p: p.size)
  failing = sorted((p for p in points if not p.fits), key=lambda p: p.size)
  if fitting and failing:
    return [fitting[-1], failing[0]]
  return fitting[-2:] if fitting else failing[:2]


def _predict(points: list[Need], fixed: int, available: int) -> float | None:
  """Size at which needed = fixed + c * size**p through `_pair(points)` reaches `available`."""
  pair = _pair(points)
  if available <= fixed:
    return 0.0
  if len(pair) < 2:
    (point,) = pair
    grown = point.needed - fixed
    return point.size * (available - fixed) / grown if grown > 0 else None
  (a, b) = pair
  grown_a, grown_b = a.needed - fixed, b.needed - fixed
  if grown_a <= 0 or grown_b <= grown_a or b.size == a.size:
    return None
  power = math.log(grown_b / grown_a) / math.log(b.size / a.size)
  exponent = math.log((available - fixed) / grown_b) / power
  return b.size * math.exp(min(exponent, 60.0))


def largest_fitting(measure: Callable[[int], Need], candidates: Sequence[int],
                    start: int) -> tuple[int, list[Need]]:
  """Largest of `candidates` (ascending) that fits, or 0 if none does; and the measurements.

  measure(size) -> Need, monotone in size; start: the first size to measure (the candidate
  nearest to it is used).
  """
  candidates = sorted(candidates)
  low, high = -1, len(candidates)  # indices: candidates[low] fits, candidates[high] does not
  index = min(range(len(candidates)), key=lambda i: abs(candidates[i] - start))
  points: list[Need] = []
  bisected = False
  while high - low > 1:
    point = measure(candidates[index])
    points.append(point)
    # Without an upper bound yet, a step cannot halve a bracket: only bounded steps count.
    width = high - low if high < len(candidates) else None
    low, high = (index, high) if point.fits else (low, index)
    if high - low <= 1:
      break
    # A bounded step that did not halve the bracket is followed by a bisection.
    bisect = width is not None and high - low > width // 2 and not bisected
    fixed = max((p.fixed for p in points if p.fixed is not None), default=0)
    guess = None if bisect else _predict(points, fixed, point.available)
    if guess is not None and high < len(candidates) and guess >= candidates[high]:
      guess = None  # the model says a size that did not fit would: it is wrong here
    if guess is not None:
      index = bisect_module.bisect_right(candidates, guess) - 1
      # A prediction that fits is checked from just above too, to close the bracket.
      index = min(max(index, low + 1), high - 1)
    elif high == len(candidates):
      index = min(2 * low + 1, high - 1)
    else:
      index = (low + high) // 2
    bisected = guess is None
  return (candidates[low] if low >= 0 else 0), points
