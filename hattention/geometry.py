"""The geometry of hierarchical attention, in plain Python: padding, query modes, packing.

Shared by the fast attention, its dense reference, the decoding cache and the LM pipeline
(FLOP counts, packed batches), so that each of them reads the same definition.

Pair rule (block size b, a row padded to b * 2**M positions): query t sees key s at level

  l(t, s) = min { l : |t // (b * 2**l) - s // (b * 2**l)| <= 1 },

through the aligned cell of 2**l positions holding s (and, for the "sample"/"mean" query
modes, the aligned cell of 2**l positions holding t).

Packing. Several segments share a row of `hierarchical_attention(..., segment_ids=...)`;
`packing_slot(n, b)` says where a segment of n positions may sit so that its outputs equal
those of `hierarchical_attention` on the segment alone (offset 0, its own padding), for every
query mode, causal or bidirectional, up to float rounding. Let P = padded_length(n, b) =
b * 2**M and W = P / 2. Alone, the segment's pairs have levels 0 .. M - 1 and its cells hold
at most 2**(M - 1) positions. Placed at offset o:

1. Levels l <= M - 2 (blocks of b * 2**l positions): if o is a multiple of b * 2**(M - 2)
   (of 1 when M = 1), every pair's block indices shift by the same whole number, so its level,
   and which of the neighbour blocks' halves it falls in, are unchanged; the cells of up to
   2**(M - 1) positions divide that multiple (b >= 2), so they hold the same positions.
2. Level M - 1: alone every remaining pair is at level M - 1. In the row it stays there when
   the segment lies inside two consecutive aligned windows of W positions (blocks of level
   M - 1): o % W + n <= 2 W. With 1., o % W is 0 or W / 2 for M >= 2, and any o % b <= 2b - n
   for M = 1 (so a segment of n <= b + 1 positions fits at every offset: all of its pairs are
   level-0 pairs wherever it sits).
3. Nothing else may enter its cells: the cells its keys and queries use cover the footprint
   [o, o + span) with span = ceil(n / 2**(M - 1)) * 2**(M - 1). If no other segment has a
   position there, every cell it uses holds its own positions only (and padding); the pair
   rule with segments then keeps exactly its own pairs, each with the same level, key cell
   and query cell as alone. Its coarse pairs with anything outside are at levels >= M, whose
   cells hold none of its keys, so the segment rule drops them.

So: place each segment at an offset o with `slot.fits_at(o)` and keep the footprints
[o, o + slot.span) of the segments of a row disjoint (e.g. first fit with
`slot.first_offset`). (For causal attention with "sample" or "fine" queries the footprint
may overlap later segments' positions: a causal row only reads cells that end before its
block and the first position of its own cells, all inside the segment. The slot does not use
this, so that one layout serves every mode.)
"""

import numbers
from typing import NamedTuple

QUERY_MODES = ("sample", "fine", "mean")


def check_power_of_two(name: str, value) -> None:
  """Raises ValueError naming `name` and `value` unless value is an int power of two >= 2.

  The one check of a block size (and of attention's chunk size) for every caller.
  """
  if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value & (value - 1):
    raise ValueError(f"{name} must be a power of two >= 2, got {value!r}")


def padded_length(length: int, block_size: int) -> int:
  """Smallest block_size * 2**M >= length with M >= 1 (block_size: a power of two >= 2)."""
  check_power_of_two("block_size", block_size)
  padded = 2 * block_size
  while padded < length:
    padded *= 2
  return padded


def level_count(length: int, block_size: int, num_levels: int | None = None) -> int:
  """M, the number of levels (0 .. M - 1) of a row of `length` positions, capped at num_levels."""
  levels = (padded_length(length, block_size) // block_size).bit_length() - 1
  return levels if num_levels is None else min(levels, num_levels)


class PackingSlot(NamedTuple):
  """Where a segment may sit in a packed row (see the module docstring for the proof).

  A segment of `length` positions may start at offset o when o % alignment == 0 and
  o % window + length <= 2 * window; no other segment may have a position in its footprint
  [o, o + span).
  """
  length: int
  alignment: int
  window: int
  span: int

  def fits_at(self, offset: int) -> bool:
    """Whether the segment may start at `offset`."""
    return (offset % self.alignment == 0
            and offset % self.window + self.length <= 2 * self.window)

  def first_offset(self, position: int) -> int:
    """The smallest offset >= position at which the segment may start."""
    offset = -(-position // self.alignment) * self.alignment
    if not self.fits_at(offset):  # the start of the next window always fits
      offset = -(-offset // self.window) * self.window
    return offset


def packing_slot(length: int, block_size: int) -> PackingSlot:
  """The PackingSlot of a segment of `length` >= 1 positions with this block size."""
  for name, value in (("length", length), ("block_size", block_size)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
      raise ValueError(f"packing_slot: {name} must be a positive int, got {value!r}")
  length, block_size = int(length), int(block_size)
  check_power_of_two("packing_slot: block_size", block_size)
  window = padded_length(length, block_size) // 2
  largest_cell = window // block_size  # 2**(M - 1) positions
  alignment = 1 if window == block_size else window // 2
  span = -(-length // largest_cell) * largest_cell
  return PackingSlot(length, alignment, window, span)
