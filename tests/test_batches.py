"""Tests for lm1b/batches.py: row layout, epoch coverage, resume, process slices, eval."""

import collections

import jax
import numpy as np
import pytest

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
  """Weights exactly on segments; padding is all PAD/0; positions restart per segment."""
  seg, w = b["segment_ids"], b["weights"]
  np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
  for key in ("inputs", "targets", "positions"):
    assert not b[key][seg == 0].any()
  for row in range(seg.shape[0]):
    s, pos = seg[row], b["positions"][row]
    used = s[s > 0]
    assert (np.diff(used) >= 0).all() and (np.diff(used) <= 1).all()  # 1,1,2,2,2,3..
    assert used.size == 0 or used[0] == 1
    assert (s[used.size:] == 0).all()  # padding only at the end
    for k in np.unique(used):
      np.testing.assert_array_equal(pos[s == k], np.arange(np.sum(s == k)))
      # targets continue the inputs within a segment
      np.testing.assert_array_equal(b["inputs"][row][s == k][1:], b["targets"][row][s == k][:-1])


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


def test_packed_rows_are_greedy(split):
  """A row is closed only when the next piece would not fit."""
  short = unique_token_split([1, 2, 1, 3, 2, 1, 1, 2])  # targets 2,3,2,4,3,2,2,3
  b = next(batches.TrainBatches(short, global_batch=8, seq_len=SEQ, mode="packed", seed=1))
  used = (b["segment_ids"] > 0).sum(axis=1)
  rows = int((used > 0).sum())
  assert used.sum() == 21 and rows == 3  # 21 targets need at least ceil(21/8) = 3 rows
  assert not b["weights"][rows:].any()


@pytest.mark.parametrize("mode", ["sentence", "packed"])
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


@pytest.mark.parametrize("mode", ["sentence", "packed"])
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


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_sentence_once_with_word_counts(split, process_count):
  per_process = [list(batches.eval_batches(split, global_batch=6, seq_len=SEQ,
                                           process_index=p, process_count=process_count))
                 for p in range(process_count)]
  counts = {len(b) for b in per_process}
  n_pieces = len(batches.make_pieces(split, SEQ))
  assert counts == {-(-n_pieces // 6)}
  assert counts == {batches.num_eval_batches(split, global_batch=6, seq_len=SEQ)}
  flat = [b for bs in per_process for b in bs]
  for b in flat:
    assert b["words"].shape == (6 // process_count,) and b["words"].dtype == np.float32
    check_layout(b)
    assert b["segment_ids"].max() <= 1
    assert not b["words"][~b["weights"].any(axis=1)].any()  # padding rows carry no words
  assert scored_pairs(flat) == expected_pairs(split)
  assert sum(float(b["words"].sum()) for b in flat) == float(split.words.sum())
  # words sit on the row whose first input is BOS (the sentence's first target)
  for b in flat:
    for r in range(b["words"].shape[0]):
      assert (b["words"][r] > 0) == (b["weights"][r, 0] > 0 and b["inputs"][r, 0] == BOS_ID)


def test_eval_order_and_final_padding():
  split = unique_token_split([2, 1, 3, 1, 1])
  got = list(batches.eval_batches(split, global_batch=4, seq_len=SEQ))
  assert len(got) == 2
  firsts = [int(b["targets"][r, 0]) for b in got for r in range(4)]
  assert firsts == [4, 6, 7, 10, 11, PAD_ID, PAD_ID, PAD_ID]
  assert got[0]["words"].tolist() == [2, 3, 4, 5] and got[1]["words"].tolist() == [6, 0, 0, 0]
  assert not got[1]["weights"][1:].any()


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
