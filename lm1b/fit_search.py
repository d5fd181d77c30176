"""The largest size that fits in memory, in few measurements.

Every measurement is a compile that takes minutes, and each one reports how many bytes it
needs (even a refused one), not just whether it fits. So instead of bisecting on yes/no, the
search fits needed(n) = fixed + c * n**p through its two measurements nearest the limit
(fixed: the bytes that do not grow with n, e.g. parameters and optimizer state; p = 1 for the
batch, about 1 for hierarchical attention's row length, up to 2 for dense attention's) and
jumps to the largest candidate that model says fits. Where the model is right that is 2-4
measurements; where it is not, a step that fails to halve the bracket is followed by a
bisection step, so the answer is always exact over the candidates, in at most about twice
the measurements of plain bisection.
"""

import dataclasses
import math
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Need:
  """One measurement: `needed` bytes per device at size `size`; `fixed` the part known not
  to grow with the size (None if unknown, e.g. for a compile the compiler refused)."""
  size: int
  needed: int
  available: int
  fixed: int | None = None

  @property
  def fits(self) -> bool:
    return self.needed <= self.available


def _predict(points: list[Need], fixed: int, available: int) -> float | None:
  """Size at which the model through the two points nearest the limit reaches `available`."""
  near = sorted(points, key=lambda p: abs(math.log(max(p.needed - fixed, 1) /
                                                    max(available - fixed, 1))))[:2]
  if len(near) < 2:
    (point,) = near
    grown = point.needed - fixed
    return point.size * max(available - fixed, 0) / grown if grown > 0 else None
  (a, b) = sorted(near, key=lambda p: p.size)
  grown_a, grown_b = a.needed - fixed, b.needed - fixed
  if grown_a <= 0 or grown_b <= grown_a or b.size == a.size:
    return None
  if available <= fixed:
    return 0.0
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
  bisect_next = False
  while high - low > 1:
    point = measure(candidates[index])
    points.append(point)
    # Without an upper bound yet, a step cannot halve a bracket: only bounded steps count.
    width = high - low if high < len(candidates) else None
    low, high = (index, high) if point.fits else (low, index)
    if high - low <= 1:
      break
    halved = width is None or high - low <= width // 2
    fixed = max((p.fixed for p in points if p.fixed is not None), default=0)
    guess = None if bisect_next else _predict(points, fixed, point.available)
    if guess is not None:
      below = [i for i, size in enumerate(candidates) if size <= guess]
      index = below[-1] if below else 0
      # A prediction that fits is checked from just above too, to close the bracket.
      index = min(max(index, low + 1), high - 1)
    elif high == len(candidates):
      index = min(2 * low + 1, high - 1)
    else:
      index = (low + high) // 2
    bisect_next = not halved and not bisect_next
  return (candidates[low] if low >= 0 else 0), points
