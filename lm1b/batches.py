"""Deterministic, resumable, process-sharded batches of a TokenizedSplit.

A batch is a dict of numpy arrays holding this process's rows of a global batch:
  inputs, targets, positions, segment_ids  int32 [rows, seq_len]
  weights                                  float32 [rows, seq_len]: 1 on scored targets
  words (eval only)                        float32 [rows, seq_len]: on the position of a
                                           sentence's first target, its word count + 1

Sentences. Each sentence is the stream [BOS] + ids + [EOS]; its (input, target) pairs are
(stream[k], stream[k + 1]) for k = 0..len(ids), so a sentence of L ids has L + 1 targets. A
sentence with more than seq_len targets is cut into pieces of seq_len pairs (the last one
shorter); piece j holds pairs j * seq_len ... Every target is scored exactly once. Positions
restart at 0 in every piece, so the model's max_len only needs to be seq_len.

Modes (`MODES`):
  sentence  one piece per row, padded (the paper's setup).
  packed    several pieces per row as segments 1, 2, ... (0 on padding), placed by `pack`
            at the offsets a `Slot` allows: for hierarchical attention
            `hattention.packing_slot`, under which a piece gets exactly the attention, hence
            the logits, it would get alone in a row (lm1b.experiment.packing_slot_for); for
            full attention anywhere (`contiguous_slot`).
  stream    rows are consecutive windows of the split's token stream [BOS] s_1 [EOS] s_2
            [EOS] ... (no segments, positions 0..seq_len-1): context crosses sentences.

Order. Epoch e visits every unit (piece, or window in stream mode) once in the order
np.random.default_rng((seed, e)).permutation. A global batch takes consecutive units of that
order from `cursor` (a unit index); an epoch's last batch may be short and is completed with
padding rows, so batches never mix epochs. The batch at (seed, epoch, cursor) is a pure
function of those ints and the split, so `state()` -> {"epoch", "cursor", "seed"} and
`restore(state)` resume exactly, and process p builds only rows [p * local, (p + 1) * local)
of each global batch (the layout of all rows is planned from lengths alone, which is cheap).
"""

import dataclasses
import logging
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from hattention import PackingSlot
from lm1b.token_cache import TokenizedSplit
from lm1b.tokenizer import BOS_ID, EOS_ID, PAD_ID

MODES = ("sentence", "packed", "stream")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


Slot = Callable[[int], PackingSlot]  # a piece's length -> where it may sit in a row


def contiguous_slot(length: int) -> PackingSlot:
  """Anywhere, taking only its own positions (full attention isolates segments exactly)."""
  return PackingSlot(length, 1, max(length, 1), length)


def _first_fit(starts: np.ndarray, limits: np.ndarray | int,
               placement: PackingSlot) -> tuple[int, int] | None:
  """(row, offset) of the first row whose free interval [starts, limits) takes the piece."""
  for row in np.flatnonzero(limits - starts >= placement.span):
    offset = placement.first_offset(int(starts[row]))
    if offset + placement.span <= (limits if np.isscalar(limits) else limits[row]):
      return int(row), offset
  return None


@dataclasses.dataclass(frozen=True)
class Pieces:
  """Row-sized pieces of a split's sentences, each [num_pieces]:

  sentence: int64 sentence index; start: int32 first pair index within the sentence's stream;
  length: int32 number of (input, target) pairs, 1..seq_len.
  """
  sentence: np.ndarray
  start: np.ndarray
  length: np.ndarray

  def __len__(self) -> int:
    return len(self.sentence)


def make_pieces(split: TokenizedSplit, seq_len: int) -> Pieces:
  """Cuts every sentence's L + 1 targets into pieces of at most seq_len pairs."""
  targets = split.lengths() + 1
  counts = -(-targets // seq_len)
  sentence = np.repeat(np.arange(len(split), dtype=np.int64), counts)
  first = np.cumsum(counts) - counts
  start = (np.arange(len(sentence), dtype=np.int64) - np.repeat(first, counts)) * seq_len
  length = np.minimum(seq_len, targets[sentence] - start)
  return Pieces(sentence=sentence, start=start.astype(np.int32), length=length.astype(np.int32))


class Layout(NamedTuple):
  """Where pieces go in a batch, each int64 [placed]: piece index, row and first column."""
  piece: np.ndarray
  row: np.ndarray
  offset: np.ndarray


def sentence_layout(pieces: np.ndarray) -> Layout:
  """One piece per row, at column 0."""
  pieces = np.asarray(pieces, np.int64)
  return Layout(pieces, np.arange(len(pieces), dtype=np.int64), np.zeros(len(pieces), np.int64))


def pack(lengths: np.ndarray, num_rows: int, seq_len: int, slot: Slot) -> tuple[Layout, int]:
  """Places pieces of `lengths` (in order) into num_rows rows; returns (layout, placed).

  First fit: each piece goes to the first row with room at an offset its slot allows, after
  the row's last piece or into the largest gap an alignment left in the row; packing stops at
  the first piece that fits nowhere (so a batch always takes a prefix). Layout.piece indexes
  `lengths`.
  """
  ends = np.zeros(num_rows, np.int64)       # first free column after each row's last piece
  gap_start = np.zeros(num_rows, np.int64)  # one free interval per row left by an alignment
  gap_end = np.zeros(num_rows, np.int64)
  placements: dict[int, PackingSlot] = {}
  rows, offsets = [], []
  for length in lengths:
    length = int(length)
    if length not in placements:
      placements[length] = slot(length)
    placement = placements[length]
    found = _first_fit(gap_start, gap_end, placement)
    if found is not None:
      row, offset = found
      gap_start[row] = offset + placement.span
    else:
      found = _first_fit(ends, seq_len, placement)
      if found is None:
        break
      row, offset = found
      if offset - ends[row] > gap_end[row] - gap_start[row]:
        gap_start[row], gap_end[row] = ends[row], offset
      ends[row] = offset + placement.span
    rows.append(row)
    offsets.append(offset)
  placed = len(rows)
  return Layout(np.arange(placed, dtype=np.int64), np.asarray(rows, np.int64),
                np.asarray(offsets, np.int64)), placed


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """All-padding batch: PAD_ID inputs/targets, zero positions/segment_ids (int32 [rows,
  seq_len]) and zero float32 weights."""
  batch = {key: np.zeros((rows, seq_len), np.int32) for key in BATCH_KEYS}
  batch["inputs"][:] = PAD_ID
  batch["targets"][:] = PAD_ID
  batch["weights"] = np.zeros((rows, seq_len), np.float32)
  return batch


def _stream_values(split: TokenizedSplit, sentence: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Token k of each given sentence's stream [BOS] + ids + [EOS], int32 [len(k)]."""
  offsets = np.asarray(split.offsets)
  lengths = offsets[sentence + 1] - offsets[sentence]
  values = np.zeros(len(k), np.int32)
  if len(split.tokens):
    index = np.clip(offsets[sentence] + k - 1, 0, len(split.tokens) - 1)
    values[:] = split.tokens[index]
  values[k == 0] = BOS_ID
  values[k == lengths + 1] = EOS_ID
  return values


def build_rows(split: TokenizedSplit, pieces: Pieces, layout: Layout, num_rows: int,
               seq_len: int, *, words: bool = False) -> dict[str, np.ndarray]:
  """Batch [num_rows, seq_len] with layout's pieces; segments numbered 1, 2, ... by column
  within each row. Vectorized over all tokens. words=True adds the `words` array."""
  batch = empty_batch(num_rows, seq_len)
  if words:
    batch["words"] = np.zeros((num_rows, seq_len), np.float32)
  if not len(layout.piece):
    return batch
  order = np.lexsort((layout.offset, layout.row))
  piece, row, offset = (x[order] for x in layout)
  first_of_row = np.r_[True, row[1:] != row[:-1]]
  run_start = np.maximum.accumulate(np.where(first_of_row, np.arange(len(row)), 0))
  segment = np.arange(len(row)) - run_start + 1
  m = pieces.length[piece].astype(np.int64)
  owner = np.repeat(np.arange(len(piece)), m)
  pos = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
  r, c = row[owner], offset[owner] + pos
  sentence = pieces.sentence[piece][owner]
  k = pieces.start[piece][owner].astype(np.int64) + pos
  batch["inputs"][r, c] = _stream_values(split, sentence, k)
  batch["targets"][r, c] = _stream_values(split, sentence, k + 1)
  batch["positions"][r, c] = pos
  batch["segment_ids"][r, c] = segment[owner]
  batch["weights"][r, c] = 1.0
  if words:
    first = k == 0
    batch["words"][r[first], c[first]] = split.words[sentence[first]]
  return batch


class Stream:
  """A split as one token stream [BOS] s_1 [EOS] s_2 [EOS] ... of `num_targets` targets:
  target j is stream token j + 1, predicted from token j."""

  def __init__(self, split: TokenizedSplit):
    self.split = split
    self.ends = np.cumsum(split.lengths() + 1)  # [n] targets up to and including sentence i
    self.num_targets = int(self.ends[-1]) if len(self.ends) else 0

  def tokens(self, index: np.ndarray) -> np.ndarray:
    """int32 stream tokens at int64 `index` (0 is the BOS)."""
    index = np.asarray(index, np.int64)
    sentence = np.searchsorted(self.ends, index, side="left")
    sentence = np.minimum(sentence, len(self.ends) - 1)
    start = self.ends[sentence] - (self.split.lengths()[sentence] + 1)  # its first target
    values = _stream_values(self.split, sentence, index - start)
    values[index == 0] = BOS_ID
    return values

  def first_targets(self) -> np.ndarray:
    """int64 [n]: the target index of each sentence's first token."""
    return self.ends - (self.split.lengths() + 1)

  def window(self, batch: dict, row: int, first: int, count: int, scored_from: int,
             words: bool) -> None:
    """Writes targets [first, first + count) into `row` of `batch` (positions 0..count-1);
    only targets >= scored_from get weight (earlier ones are context)."""
    target = np.arange(first, first + count, dtype=np.int64)
    cols = np.arange(count)
    batch["inputs"][row, cols] = self.tokens(target)
    batch["targets"][row, cols] = self.tokens(target + 1)
    batch["positions"][row, cols] = cols
    batch["segment_ids"][row, cols] = 1
    batch["weights"][row, cols] = (target >= scored_from).astype(np.float32)
    if words:
      starts = self.first_targets()
      lo, hi = np.searchsorted(starts, [max(first, scored_from), first + count])
      batch["words"][row, starts[lo:hi] - first] = self.split.words[lo:hi]


def check_sharding(global_batch: int, process_index: int, process_count: int) -> int:
  """Returns the per-process row count."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                     f"process_count={process_count}")
  return global_batch // process_count


class TrainBatches:
  """Infinite iterator over this process's rows of deterministic global training batches."""

  def __init__(self, split: TokenizedSplit, *, global_batch: int, seq_len: int,
               mode: str = "sentence", seed: int = 0, process_index: int = 0,
               process_count: int = 1, slot: Slot = contiguous_slot):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be positive")
    if len(split) == 0:
      raise ValueError("TrainBatches needs a split with at least one sentence")
    self._local = check_sharding(global_batch, process_index, process_count)
    self._split, self._seq_len, self._mode, self._slot = split, seq_len, mode, slot
    self._global, self._process_index = global_batch, process_index
    self._seed, self._epoch, self._cursor = int(seed), 0, 0
    self._order_epoch, self._order = -1, np.zeros(0, np.int64)
    if mode == "stream":
      self._stream = Stream(split)
      self._num_units = -(-self._stream.num_targets // seq_len)
      logging.info("Train split: %d sentences, %d targets in %d windows of %d (stream)",
                   len(split), self._stream.num_targets, self._num_units, seq_len)
    else:
      self._pieces = make_pieces(split, seq_len)
      self._num_units = len(self._pieces)
      long = int(np.count_nonzero(self._pieces.start == seq_len))
      logging.info("Train split: %d sentences, %d pieces of <= %d targets; %d sentences "
                   "longer than seq_len were split (none dropped); mode=%s", len(split),
                   self._num_units, seq_len, long, mode)

  @property
  def num_units(self) -> int:
    """Pieces (sentence, packed) or windows (stream) per epoch."""
    return self._num_units

  def state(self) -> dict[str, int]:
    """The position in the stream: the next batch starts at unit `cursor` of epoch `epoch`."""
    return {"epoch": self._epoch, "cursor": self._cursor, "seed": self._seed}

  def restore(self, state: dict) -> None:
    """Continues exactly where the iterator that produced `state` stopped.

    The state indexes units, so it is only meaningful for the same split, seq_len and mode
    family (pieces or windows); any global_batch or process count may be used after it.
    """
    epoch, cursor, seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
    if epoch < 0 or not 0 <= cursor < self._num_units:
      raise ValueError(f"Invalid data state {dict(state)} for a split of {self._num_units} "
                       "units")
    if seed != self._seed:
      logging.warning("Restoring data seed %d (configured seed %d)", seed, self._seed)
    self._epoch, self._cursor, self._seed = epoch, cursor, seed

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self._epoch:
      rng = np.random.default_rng((self._seed, self._epoch))
      self._order, self._order_epoch = rng.permutation(self._num_units), self._epoch
    return self._order

  def _next_rows(self, units: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """This process's rows of the global batch starting with `units`; units consumed."""
    lo, hi = self._process_index * self._local, (self._process_index + 1) * self._local
    if self._mode == "stream":
      batch = empty_batch(self._local, self._seq_len)
      count = min(len(units), self._global)
      for row in range(lo, min(hi, count)):
        first = int(units[row]) * self._seq_len
        width = min(self._seq_len, self._stream.num_targets - first)
        self._stream.window(batch, row - lo, first, width, first, words=False)
      return batch, count
    if self._mode == "sentence":
      count = min(len(units), self._global)
      layout = sentence_layout(units[:count])
    else:
      window = units[:self._global * self._seq_len]
      layout, count = pack(self._pieces.length[window], self._global, self._seq_len,
                           self._slot)
      layout = layout._replace(piece=window[layout.piece])
    mine = (layout.row >= lo) & (layout.row < hi)
    local = Layout(layout.piece[mine], layout.row[mine] - lo, layout.offset[mine])
    return build_rows(self._split, self._pieces, local, self._local, self._seq_len), count

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch, count = self._next_rows(self._epoch_order()[self._cursor:])
    self._cursor += count
    if self._cursor == self._num_units:
      self._epoch, self._cursor = self._epoch + 1, 0
    return batch


def eval_batches(split: TokenizedSplit, *, global_batch: int, seq_len: int,
                 mode: str = "sentence", slot: Slot = contiguous_slot, overlap: int = 0,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Batches that score every target of the split exactly once, in order, with `words`.

  sentence/packed: every piece once (packed: several per row, as in training). stream:
  windows of seq_len positions advancing by seq_len - overlap; the first `overlap` positions
  of every window but the first are context only (scored by the window before), so each
  target is scored once with at least `overlap` targets of left context. The last global
  batch is completed with padding rows; every process yields the same number of batches.
  """
  local = check_sharding(global_batch, process_index, process_count)
  lo = process_index * local
  if mode == "stream":
    yield from _stream_eval_batches(Stream(split), global_batch, seq_len, overlap, lo, local)
    return
  pieces = make_pieces(split, seq_len)
  first = 0
  while first < len(pieces):
    if mode == "sentence":
      count = min(global_batch, len(pieces) - first)
      layout = sentence_layout(np.arange(count))
    else:
      layout, count = pack(pieces.length[first:first + global_batch * seq_len], global_batch,
                           seq_len, slot)
    mine = (layout.row >= lo) & (layout.row < lo + local)
    yield build_rows(split, pieces, Layout(layout.piece[mine] + first, layout.row[mine] - lo,
                                           layout.offset[mine]), local, seq_len, words=True)
    first += count


def _stream_eval_batches(stream: Stream, global_batch: int, seq_len: int, overlap: int,
                         lo: int, local: int) -> Iterator[dict[str, np.ndarray]]:
  if not 0 <= overlap < seq_len:
    raise ValueError(f"overlap={overlap} must be in [0, seq_len={seq_len})")
  stride = seq_len - overlap
  # window w scores targets [w * stride + (overlap if w else 0), (w + 1) * stride + overlap)
  num_windows = max(1, -(-(stream.num_targets - overlap) // stride))
  for first_window in range(0, num_windows, global_batch):
    batch = empty_batch(local, seq_len)
    batch["words"] = np.zeros((local, seq_len), np.float32)
    for row in range(local):
      w = first_window + lo + row
      if w >= num_windows:
        break
      first = w * stride
      width = min(seq_len, stream.num_targets - first)
      stream.window(batch, row, first, width, first + (overlap if w else 0), words=True)
    yield batch


def to_global_arrays(local_batch: dict[str, np.ndarray],
                     sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays [global_batch, ...] sharded by `sharding`.

  `sharding` shards the leading (row) axis, e.g. NamedSharding(mesh, P(("data", "fsdp"))).
  """
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}
