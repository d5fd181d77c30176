"""Tests for lm1b/batches.py: row layout, epoch coverage, resume, process slices, eval."""

import collections

import jax
import numpy as np
import pytest

from hattention import PackingSlot

from lm1b import batches
from lm1b.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tests.fake_source import split_from_ids, unique_token_split

SEQ = 8
# Lengths 0..20 ids: many sentences longer than SEQ targets, one empty sentence.
LENGTHS = [int(x) for x in np.random.default_rng(0).integers(1, 21, size=37)] + [0, 7, 8, 16]


@pytest.fixture(scope="module")
def split():
  return unique_token_split(LENGTHS)


def expected_pairs(split):
  """Counter of every (input, target) pair a full epoch must score once."""
  pairs = collections.Counter()
  for i in range(len(split)):
    stream = [BOS_ID] + split.sentence(i).tolist() + [EOS_ID]
    pairs.update(zip(stream[:-1], stream[1:]))
  return pairs


def scored_pairs(batch_list):
  pairs = collections.Counter()
  for b in batch_list:
    mask = b["weights"] > 0
    pairs.update(zip(b["inputs"][mask].tolist(), b["targets"][mask].tolist()))
  return pairs


def one_epoch(it):
  epoch = it.state()["epoch"]
  out = [next(it)]
  while it.state()["epoch"] == epoch:
    out.append(next(it))
  assert it.state()["cursor"] == 0
  return out


def check_layout(b):
  """Weights exactly on segments; padding is all PAD/0; segments are contiguous runs numbered
  1, 2, ... by column; positions restart per segment; targets continue the inputs."""
  seg, w = b["segment_ids"], b["weights"]
  np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
  for key in ("inputs", "targets", "positions"):
    assert not b[key][seg == 0].any()
  for row in range(seg.shape[0]):
    s, pos = seg[row], b["positions"][row]
    used = s[s > 0]
    assert (np.diff(used) >= 0).all() and (np.diff(used) <= 1).all()  # 1,1,2,2,2,3..
    assert used.size == 0 or used[0] == 1
    for k in np.unique(used):
      columns = np.flatnonzero(s == k)
      assert (np.diff(columns) == 1).all()  # one contiguous run
      np.testing.assert_array_equal(pos[columns], np.arange(columns.size))
      np.testing.assert_array_equal(b["inputs"][row][columns][1:],
                                    b["targets"][row][columns][:-1])


def test_make_pieces_splits_long_sentences():
  pieces = batches.make_pieces(split_from_ids([[5] * 3, [5] * 7, [5] * 8, [5] * 20, []]), SEQ)
  # targets: 4, 8, 9, 21, 1
  assert pieces.sentence.tolist() == [0, 1, 2, 2, 3, 3, 3, 4]
  assert pieces.start.tolist() == [0, 0, 0, 8, 0, 8, 16, 0]
  assert pieces.length.tolist() == [4, 8, 8, 1, 8, 8, 5, 1]


@pytest.mark.parametrize("mode", ["sentence", "packed"])
def test_epoch_scores_every_target_exactly_once(split, mode):
  it = batches.TrainBatches(split, global_batch=4, seq_len=SEQ, mode=mode, seed=3)
  epoch = one_epoch(it)
  for b in epoch:
    assert b["inputs"].shape == (4, SEQ) and b["inputs"].dtype == np.int32
    assert b["weights"].dtype == np.float32
    check_layout(b)
  assert scored_pairs(epoch) == expected_pairs(split)
  total_targets = int(np.sum(split.lengths() + 1))
  assert sum(float(b["weights"].sum()) for b in epoch) == total_targets
  second = one_epoch(it)
  assert scored_pairs(second) == expected_pairs(split)
  assert [b["inputs"].tolist() for b in second] != [b["inputs"].tolist() for b in epoch]


def test_sentence_mode_rows_hold_one_piece_starting_with_bos_or_continuation(split):
  it = batches.TrainBatches(split, global_batch=4, seq_len=SEQ, mode="sentence")
  pieces = batches.make_pieces(split, SEQ)
  epoch = one_epoch(it)
  rows = [r for b in epoch for r in range(4) if b["weights"][r].any()]
  assert len(rows) == len(pieces)
  for b in epoch:
    assert b["segment_ids"].max() <= 1
  firsts = collections.Counter(int(b["inputs"][r, 0]) for b in epoch for r in range(4)
                               if b["weights"][r].any())
  assert firsts[BOS_ID] == len(split)  # one row per sentence starts at BOS; others continue


def test_packed_mode_packs_several_sentences(split):
  sentence_rows = len(one_epoch(batches.TrainBatches(split, global_batch=4, seq_len=SEQ)))
  packed = one_epoch(batches.TrainBatches(split, global_batch=4, seq_len=SEQ, mode="packed"))
  assert len(packed) < sentence_rows
  assert max(int(b["segment_ids"].max()) for b in packed) >= 2


def test_packed_rows_are_first_fit(split):
  """A piece goes to the first row with room; a batch ends at the first piece that fits
  nowhere."""
  short = unique_token_split([1, 2, 1, 3, 2, 1, 1, 2])  # targets 2,3,2,4,3,2,2,3
  b = next(batches.TrainBatches(short, global_batch=8, seq_len=SEQ, mode="packed", seed=1))
  used = (b["segment_ids"] > 0).sum(axis=1)
  rows = int((used > 0).sum())
  assert used.sum() == 21 and rows == 3  # 21 targets need at least ceil(21/8) = 3 rows
  assert not b["weights"][rows:].any()


def aligned_slot(length):
  """A test slot: starts at multiples of 4, reserves the length rounded up to even."""
  return PackingSlot(length, 4, 32, length + length % 2)


def test_pack_respects_alignment_and_reserved_spans():
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 15, size=200)
  layout, placed = batches.pack(lengths, num_rows=6, seq_len=32, slot=aligned_slot)
  assert 0 < placed < 200 and layout.piece.tolist() == list(range(placed))
  assert (layout.offset % 4 == 0).all()
  for row in range(6):
    mine = layout.row == row
    spans = sorted((o, o + aligned_slot(int(n)).span)
                   for o, n in zip(layout.offset[mine], lengths[layout.piece[mine]]))
    assert all(end <= 32 for _, end in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
  # the first unplaced piece fits in no row after the end of its last piece
  ends = [max([o + aligned_slot(int(lengths[p])).span for p, r, o in zip(*layout) if r == row],
              default=0) for row in range(6)]
  need = aligned_slot(int(lengths[placed])).span
  assert all(-(-end // 4) * 4 + need > 32 for end in ends)


def test_pack_keeps_pieces_within_two_windows():
  slot = lambda n: PackingSlot(n, 4, 8, n)  # o % 8 + n <= 16
  layout, placed = batches.pack(np.array([2, 13]), num_rows=1, seq_len=32, slot=slot)
  assert placed == 2 and layout.offset.tolist() == [0, 8]  # 4 % 8 + 13 > 16: next window


def test_pack_fills_alignment_gaps_with_small_pieces():
  slot = lambda n: PackingSlot(n, 8 if n > 3 else 1, 16, n)  # short ones anywhere
  layout, placed = batches.pack(np.array([5, 5, 2]), num_rows=1, seq_len=16, slot=slot)
  assert placed == 3
  assert layout.offset.tolist() == [0, 8, 5]  # the short piece sits in the gap 5..8


def test_packed_batches_with_an_aligned_slot_score_every_target_once(split):
  it = batches.TrainBatches(split, global_batch=4, seq_len=16, mode="packed", seed=2,
                            slot=aligned_slot)
  epoch = one_epoch(it)
  for b in epoch:
    check_layout(b)
    for row in range(4):
      starts = np.flatnonzero(np.diff(np.r_[0, b["segment_ids"][row]]) > 0)
      assert (starts % 4 == 0).all()
  assert scored_pairs(epoch) == expected_pairs(split)


@pytest.mark.parametrize("mode", ["sentence", "packed", "stream"])
def test_resume_continues_exactly(split, mode):
  kwargs = dict(global_batch=4, seq_len=SEQ, mode=mode, seed=11)
  straight = batches.TrainBatches(split, **kwargs)
  reference = [next(straight) for _ in range(25)]  # crosses epoch boundaries
  first = batches.TrainBatches(split, **kwargs)
  for _ in range(9):
    next(first)
  state = first.state()
  assert set(state) == {"epoch", "cursor", "seed"}
  assert all(type(v) is int for v in state.values())
  resumed = batches.TrainBatches(split, **{**kwargs, "seed": 0})
  resumed.restore(state)
  for want in reference[9:]:
    got = next(resumed)
    for key in batches.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key])


def test_restore_rejects_bad_state(split):
  it = batches.TrainBatches(split, global_batch=4, seq_len=SEQ)
  with pytest.raises(ValueError, match="cursor"):
    it.restore({"epoch": 0, "cursor": 10**6, "seed": 0})


def test_seed_changes_order(split):
  a = next(batches.TrainBatches(split, global_batch=4, seq_len=SEQ, seed=0))
  b = next(batches.TrainBatches(split, global_batch=4, seq_len=SEQ, seed=1))
  assert a["inputs"].tolist() != b["inputs"].tolist()


@pytest.mark.parametrize("mode", ["sentence", "packed", "stream"])
def test_two_processes_get_disjoint_slices_of_the_global_batch(split, mode):
  kwargs = dict(global_batch=6, seq_len=SEQ, mode=mode, seed=5)
  whole = batches.TrainBatches(split, **kwargs)
  parts = [batches.TrainBatches(split, **kwargs, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(20):
    want = next(whole)
    got = [next(p) for p in parts]
    assert got[0]["inputs"].shape == (3, SEQ)
    for key in batches.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    assert parts[0].state() == parts[1].state() == whole.state()


def test_global_batch_must_divide_by_process_count(split):
  with pytest.raises(ValueError, match="global_batch=5"):
    batches.TrainBatches(split, global_batch=5, seq_len=SEQ, process_count=2)
  with pytest.raises(ValueError, match="mode"):
    batches.TrainBatches(split, global_batch=4, seq_len=SEQ, mode="bucketed")


def check_eval(batch_list, split, seq_len):
  """Every target once, words on each sentence's first target, nothing on padding."""
  for b in batch_list:
    assert b["words"].shape == b["inputs"].shape and b["words"].dtype == np.float32
    assert not b["words"][b["weights"] == 0].any()
  assert scored_pairs(batch_list) == expected_pairs(split)
  assert sum(float(b["words"].sum()) for b in batch_list) == float(split.words.sum())
  assert sum(int((b["words"] > 0).sum()) for b in batch_list) == len(split)


@pytest.mark.parametrize("mode", ["sentence", "packed"])
@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_sentence_once_with_word_counts(split, process_count, mode):
  per_process = [list(batches.eval_batches(split, global_batch=6, seq_len=SEQ, mode=mode,
                                           process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert len({len(b) for b in per_process}) == 1
  if mode == "sentence":
    assert len(per_process[0]) == -(-len(batches.make_pieces(split, SEQ)) // 6)
  flat = [b for bs in per_process for b in bs]
  for b in flat:
    check_layout(b)
    assert b["inputs"].shape == (6 // process_count, SEQ)
    # words sit where a sentence's first target is predicted from BOS
    np.testing.assert_array_equal(b["words"] > 0, (b["inputs"] == BOS_ID) & (b["weights"] > 0))
  check_eval(flat, split, SEQ)


def test_eval_order_and_final_padding():
  split = unique_token_split([2, 1, 3, 1, 1])
  got = list(batches.eval_batches(split, global_batch=4, seq_len=SEQ))
  assert len(got) == 2
  firsts = [int(b["targets"][r, 0]) for b in got for r in range(4)]
  assert firsts == [4, 6, 7, 10, 11, PAD_ID, PAD_ID, PAD_ID]
  assert got[0]["words"][:, 0].tolist() == [2, 3, 4, 5]
  assert got[1]["words"][:, 0].tolist() == [6, 0, 0, 0]
  assert not got[1]["weights"][1:].any()


def stream_pairs(split):
  """(input, target) pairs of the whole stream [BOS] s1 [EOS] s2 [EOS] ..."""
  stream = [BOS_ID]
  for i in range(len(split)):
    stream += split.sentence(i).tolist() + [EOS_ID]
  return collections.Counter(zip(stream[:-1], stream[1:])), stream


def test_stream_epoch_is_the_whole_stream_in_windows(split):
  it = batches.TrainBatches(split, global_batch=3, seq_len=SEQ, mode="stream", seed=4)
  epoch = one_epoch(it)
  pairs, stream = stream_pairs(split)
  assert scored_pairs(epoch) == pairs  # every target once, context across sentences
  rows = [(b["inputs"][r], b["weights"][r]) for b in epoch for r in range(3)
          if b["weights"][r].any()]
  assert len(rows) == it.num_units == -(-(len(stream) - 1) // SEQ)
  windows = {tuple(inputs[w > 0].tolist()) for inputs, w in rows}
  want = {tuple(stream[i:i + SEQ][:len(stream) - 1 - i]) for i in range(0, len(stream) - 1, SEQ)}
  assert windows == want
  for b in epoch:
    assert set(np.unique(b["segment_ids"])) <= {0, 1}
    for r in range(3):
      n = int(b["weights"][r].sum())
      np.testing.assert_array_equal(b["positions"][r, :n], np.arange(n))


@pytest.mark.parametrize("overlap", [0, 3])
@pytest.mark.parametrize("process_count", [1, 2])
def test_stream_eval_scores_every_target_once(split, overlap, process_count):
  per_process = [list(batches.eval_batches(split, global_batch=4, seq_len=SEQ, mode="stream",
                                           overlap=overlap, process_index=p,
                                           process_count=process_count))
                 for p in range(process_count)]
  assert len({len(b) for b in per_process}) == 1
  flat = [b for bs in per_process for b in bs]
  pairs, _ = stream_pairs(split)
  assert scored_pairs(flat) == pairs
  assert sum(float(b["words"].sum()) for b in flat) == float(split.words.sum())
  assert sum(int((b["words"] > 0).sum()) for b in flat) == len(split)
  context = [int((b["weights"][r] == 0).sum() - (b["segment_ids"][r] == 0).sum())
             for b in flat for r in range(b["inputs"].shape[0]) if b["weights"][r].any()]
  assert context[0] == 0 and set(context[1:]) == {overlap}  # context positions, unscored


def test_to_global_arrays_on_one_device(split):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  local = next(iter(batches.eval_batches(split, global_batch=4, seq_len=SEQ)))
  arrays = batches.to_global_arrays(local, sharding)
  assert set(arrays) == set(local)
  for key, value in local.items():
    assert isinstance(arrays[key], jax.Array)
    assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(arrays[key]), value)
