"""Deterministic, resumable, process-sharded batches of a TokenizedSplit.

A batch is a dict of numpy arrays holding this process's rows of a global batch:
  inputs, targets, positions, segment_ids  int32 [rows, seq_len]
  weights                                  float32 [rows, seq_len]: 1 on targets, 0 on padding
  words (eval only)                        float32 [rows]

Rows. Each sentence is the stream [BOS] + ids + [EOS]; its (input, target) pairs are
(stream[k], stream[k + 1]) for k = 0..len(ids), so a sentence of L ids has L + 1 targets. A
sentence with more than seq_len targets is cut into pieces of seq_len pairs (the last one
shorter); piece j holds pairs j * seq_len ... Every target is therefore scored exactly once.
Positions restart at 0 in every piece (a continuation piece does not see the earlier part of its
sentence), so the model's max_len only needs to be seq_len. segment_ids are 1, 2, ... for the
pieces in a row and 0 on padding; PAD_ID fills inputs/targets of padding.

Modes:
  sentence  one piece per row, padded (the paper's setup).
  packed    pieces greedily packed in epoch order: a row takes the next pieces while they fit.

Order. Epoch e visits every piece once in the order np.random.default_rng((seed, e)).permutation.
Global batches are consecutive runs of that order starting at `cursor` (a piece index); an
epoch's last global batch may be short and is completed with all-padding rows, so batches never
mix epochs. The global batch at (seed, epoch, cursor) is a pure function of those ints and the
split, so `state()` -> {"epoch", "cursor", "seed"} and `restore(state)` resume exactly, and
process p builds only rows [p * local, (p + 1) * local) of each global batch (packed mode plans
all row boundaries from piece lengths alone, which is cheap).
"""

import dataclasses
import logging
from typing import Iterator, Sequence

import jax
import numpy as np

from lm1b.token_cache import TokenizedSplit
from lm1b.tokenizer import BOS_ID, EOS_ID, PAD_ID

MODES = ("sentence", "packed")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


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


def build_rows(split: TokenizedSplit, pieces: Pieces, rows: Sequence[Sequence[int]],
               num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """Batch [num_rows, seq_len]: row r holds pieces rows[r] in order as segments 1, 2, ...

  Rows past len(rows) and columns past a row's pieces are padding. Vectorized over all tokens.
  """
  batch = empty_batch(num_rows, seq_len)
  counts = np.array([len(r) for r in rows], np.int64)
  if not counts.sum():
    return batch
  p = np.concatenate([np.asarray(r, np.int64) for r in rows])
  m = pieces.length[p].astype(np.int64)
  exclusive = np.cumsum(m) - m
  row_first = np.repeat(np.cumsum(counts) - counts, counts)
  col0 = exclusive - exclusive[row_first]
  segment = np.arange(len(p)) - row_first + 1
  owner = np.repeat(np.arange(len(p)), m)
  pos = np.arange(int(m.sum())) - exclusive[owner]
  row = np.repeat(np.arange(len(rows)), counts)[owner]
  col = col0[owner] + pos
  sentence = pieces.sentence[p][owner]
  k = pieces.start[p][owner].astype(np.int64) + pos
  batch["inputs"][row, col] = _stream_values(split, sentence, k)
  batch["targets"][row, col] = _stream_values(split, sentence, k + 1)
  batch["positions"][row, col] = pos
  batch["segment_ids"][row, col] = segment[owner]
  batch["weights"][row, col] = 1.0
  return batch


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
               process_count: int = 1):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be positive")
    if len(split) == 0:
      raise ValueError("TrainBatches needs a split with at least one sentence")
    self._local = check_sharding(global_batch, process_index, process_count)
    self._split, self._seq_len, self._mode = split, seq_len, mode
    self._global, self._process_index = global_batch, process_index
    self._pieces = make_pieces(split, seq_len)
    self._seed, self._epoch, self._cursor = int(seed), 0, 0
    self._order_epoch, self._order = -1, np.zeros(0, np.int64)
    long = int(np.count_nonzero(self._pieces.start == seq_len))
    logging.info("Train split: %d sentences, %d pieces of <= %d targets; %d sentences longer "
                 "than seq_len were split (none dropped); mode=%s", len(split), len(self._pieces),
                 seq_len, long, mode)

  @property
  def num_pieces(self) -> int:
    return len(self._pieces)

  def state(self) -> dict[str, int]:
    """The position in the stream: the next batch starts at piece `cursor` of epoch `epoch`."""
    return {"epoch": self._epoch, "cursor": self._cursor, "seed": self._seed}

  def restore(self, state: dict) -> None:
    """Continues exactly where the iterator that produced `state` stopped.

    The state indexes pieces, so it is only meaningful for the same split and seq_len (any
    global_batch, mode or process count may be used after restoring).
    """
    epoch, cursor, seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
    if epoch < 0 or not 0 <= cursor < len(self._pieces):
      raise ValueError(f"Invalid data state {dict(state)} for a split of {len(self._pieces)} "
                       "pieces")
    if seed != self._seed:
      logging.warning("Restoring data seed %d (configured seed %d)", seed, self._seed)
    self._epoch, self._cursor, self._seed = epoch, cursor, seed

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self._epoch:
      rng = np.random.default_rng((self._seed, self._epoch))
      self._order, self._order_epoch = rng.permutation(len(self._pieces)), self._epoch
    return self._order

  def _plan(self, order: np.ndarray) -> tuple[list[list[int]], int]:
    """Rows (lists of piece indices) of the global batch at the cursor, and the next cursor."""
    window = order[self._cursor:self._cursor + self._global * self._seq_len]
    if self._mode == "sentence":
      return [[int(p)] for p in window[:self._global]], self._cursor + min(len(window),
                                                                            self._global)
    ends = np.concatenate([[0], np.cumsum(self._pieces.length[window])])
    rows, i = [], 0
    while len(rows) < self._global and i < len(window):
      j = int(np.searchsorted(ends, ends[i] + self._seq_len, side="right")) - 1
      rows.append([int(p) for p in window[i:j]])
      i = j
    return rows, self._cursor + i

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows, cursor = self._plan(self._epoch_order())
    lo = self._process_index * self._local
    batch = build_rows(self._split, self._pieces, rows[lo:lo + self._local], self._local,
                         self._seq_len)
    self._cursor = cursor
    if self._cursor == len(self._pieces):
      self._epoch, self._cursor = self._epoch + 1, 0
    return batch


def num_eval_batches(split: TokenizedSplit, *, global_batch: int, seq_len: int) -> int:
  """Number of global eval batches (the same on every process)."""
  return -(-len(make_pieces(split, seq_len)) // global_batch)


def eval_batches(split: TokenizedSplit, *, global_batch: int, seq_len: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every piece of every sentence exactly once, in order, one piece per row.

  Adds `words` float32 [rows]: the sentence's word count (+1) on the row holding its first
  target, else 0. The final global batch is completed with all-padding rows, so every process
  yields ceil(num_pieces / global_batch) batches.
  """
  local = check_sharding(global_batch, process_index, process_count)
  pieces = make_pieces(split, seq_len)
  for first in range(0, len(pieces), global_batch):
    lo = min(first + process_index * local, len(pieces))
    ids = range(lo, min(lo + local, first + global_batch, len(pieces)))
    batch = build_rows(split, pieces, [[p] for p in ids], local, seq_len)
    batch["words"] = np.zeros(local, np.float32)
    for r, p in enumerate(ids):
      if pieces.start[p] == 0:
        batch["words"][r] = split.words[pieces.sentence[p]]
    yield batch


def to_global_arrays(local_batch: dict[str, np.ndarray],
                     sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays [global_batch, ...] sharded by `sharding`.

  `sharding` shards the leading (row) axis, e.g. NamedSharding(mesh, P(("data", "fsdp"))).
  """
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}
