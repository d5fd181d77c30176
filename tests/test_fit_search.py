"""lm1b.fit_search finds the exact largest fitting size in few measurements."""

import math
import random

import pytest

from lm1b import fit_search


def _search(needed, candidates, start, available, fixed=None, refused=lambda size: False):
  measured = []

  def measure(size):
    measured.append(size)
    return fit_search.Need(size, needed(size), available, fixed, refused(size))

  largest, points = fit_search.largest_fitting(measure, candidates, start)
  assert [p.size for p in points] == measured and len(set(measured)) == len(measured)
  return largest, measured


def _truth(needed, candidates, available):
  return max((c for c in candidates if needed(c) <= available), default=0)


@pytest.mark.parametrize("start", [8, 256, 4096, 30000])
def test_linear_memory_takes_few_compiles(start):
  candidates = range(8, 8 * 4096 + 1, 8)
  needed = lambda n: 600_000 + 7_000 * n  # state + per-row activations
  largest, measured = _search(needed, candidates, start, 16_000_000, fixed=600_000)
  assert largest == _truth(needed, candidates, 16_000_000) == 2200
  assert len(measured) <= 4, measured


def test_quadratic_memory_over_powers_of_two():
  candidates = [2**k for k in range(7, 21)]
  needed = lambda n: 5_000 + 3 * n + n * n // 64
  largest, measured = _search(needed, candidates, 1024, 16 * 2**20, fixed=5_000)
  assert largest == _truth(needed, candidates, 16 * 2**20) == 16384
  assert len(measured) <= 5, measured


@pytest.mark.parametrize("seed", range(40))
def test_any_monotone_curve_gives_the_exact_answer(seed):
  rng = random.Random(seed)
  candidates = sorted(rng.sample(range(1, 5000), rng.randint(1, 300)))
  steps = {c: rng.choice([0, 1, 5, 1000, 10**6]) for c in candidates}
  total, table = rng.randint(0, 10**6), {}
  for c in candidates:
    total += steps[c]
    table[c] = total
  available = rng.randint(0, total + 10)
  largest, measured = _search(table.__getitem__, candidates, rng.choice(candidates), available,
                              fixed=rng.choice([None, 0, table[candidates[0]] // 2]))
  assert largest == _truth(table.__getitem__, candidates, available)
  assert len(measured) <= 2 * math.ceil(math.log2(len(candidates) + 1)) + 3


def test_nothing_fits_and_everything_fits():
  assert _search(lambda n: 100 + n, range(1, 50), 10, 50)[0] == 0
  largest, measured = _search(lambda n: 100 + n, range(1, 50), 10, 10**6)
  assert largest == 49 and len(measured) <= 6


def test_a_compiler_that_saves_memory_near_the_limit_and_refuses_below_its_size():
  # The 53M unrolled step on a v5e-8 (GiB per chip by global batch): XLA trades time for
  # memory near the chip's size (14.66 at 1280 rows, 14.76 at 1408), and refuses programs
  # whose own count is still under the chip's nominal 16 GiB.
  def needed(batch):
    if batch <= 1280:
      return 0.59 + 14.07 * batch / 1280
    return 14.66 + (batch - 1280) * 0.0016

  limit = 1800
  largest, measured = _search(needed, range(8, 8 * 4096 + 1, 8), 256, 16.0, fixed=0.59,
                              refused=lambda batch: batch > limit)
  assert largest == limit
  assert len(measured) <= 2 * math.ceil(math.log2(4096)) + 3, measured
