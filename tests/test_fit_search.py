"""lm1b.fit_search finds the exact largest fitting size in few measurements."""

import math
import random

import pytest

from lm1b import fit_search


def _search(needed, candidates, start, available, fixed=None):
  measured = []

  def measure(size):
    measured.append(size)
    return fit_search.Need(size, needed(size), available, fixed)

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
  assert len(measured) <= 4, measured


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
