"""Tests for lm1b.checkpoints: round trip, item-wise restore, checksums against real damage
of Orbax files, fallback and quarantine, shape mismatches, failed asynchronous saves, and a
quiet stderr."""

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from lm1b import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# After a failed restore, orbax/tensorstore sometimes completes a future on an asyncio loop
# it has already closed; pytest reports the harmless RuntimeError from a finaliser.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _items(seed: int) -> dict:
  """Small checkpoint items: params, an optimizer-like state, step and rng."""
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(48,)), jnp.float32)}}
  opt_state = {"mu": jax.tree.map(lambda x: x * 0.5, params),
               "count": jnp.asarray(seed, jnp.int32)}
  return {"params": params, "opt_state": opt_state,
          "train": {"step": jnp.asarray(seed, jnp.int32),
                    "rng": jax.random.key_data(jax.random.key(seed))}}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree)


ABSTRACT = _abstract(_items(0))


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_state(step):
  return {"epoch": np.int64(step // 10), "cursor": step}


def _save_steps(ckpt, steps):
  for step in steps:
    assert ckpt.save(step, _items(step), _data_state(step), f"cfg {step}", force=True)
  ckpt.wait()


@pytest.fixture(scope="module", name="saved_dir")
def fixture_saved_dir(tmp_path_factory):
  """A checkpoint directory with steps 10 and 20 (copied by each test that damages it)."""
  directory = tmp_path_factory.mktemp("saved") / "ckpt"
  with checkpoints.Checkpointer(directory, keep=3, async_save=True) as ckpt:
    _save_steps(ckpt, [10, 20])
  return directory


@pytest.fixture(name="ckpt_dir")
def fixture_ckpt_dir(saved_dir, tmp_path):
  """A copy of saved_dir for one test to damage."""
  target = tmp_path / "ckpt"
  shutil.copytree(saved_dir, target)
  return target


def test_round_trip_and_items_restored_alone(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir, keep=3, save_every=5) as ckpt:
    assert ckpt.all_steps() == [10, 20] and ckpt.latest_step() == 20
    assert not ckpt.should_save(3) and ckpt.should_save(5) and not ckpt.should_save(20)
    assert not ckpt.save(3, _items(3), {}, "x")  # not a save step, not forced
    assert not ckpt.save(20, _items(6), {}, "", force=True)  # never rewritten
    restored = ckpt.restore(ABSTRACT)
    assert restored.step == 20 and restored.damaged == []
    assert restored.data_state == {"epoch": 2, "cursor": 20}
    assert restored.config_text == "cfg 20"
    _assert_tree_equal(restored.items, _items(20))
    kernel = restored.items["params"]["dense"]["kernel"]
    assert kernel.sharding == ABSTRACT["params"]["dense"]["kernel"].sharding
    # The optimizer state is never read for a params-only restore: remove it from disk.
    shutil.rmtree(os.path.join(ckpt.step_path(10), "opt_state"))
    alone = ckpt.restore({"params": ABSTRACT["params"]}, step=10)
    assert list(alone.items) == ["params"] and alone.step == 10
    _assert_tree_equal(alone.items["params"], _items(10)["params"])


def test_keep_last_k_and_missing_step(tmp_path):
  with checkpoints.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
    _save_steps(ckpt, [1, 2, 3])
    assert ckpt.all_steps() == [2, 3]
    assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["2", "3"]
    with pytest.raises(checkpoints.NoCheckpointError, match=r"step 1 .*have \[2, 3\]"):
      ckpt.restore(ABSTRACT, step=1)
    with pytest.raises(FileNotFoundError):  # NoCheckpointError is one
      ckpt.check_compatible(ABSTRACT, step=7)


def _array_files(step_dir, item="params"):
  """The data files of one item's arrays (OCDBT data under ocdbt.process_*/d/)."""
  root = os.path.join(step_dir, item)
  files = [os.path.join(base, name) for base, _, names in os.walk(root) for name in names
           if os.path.basename(base) == "d" and "ocdbt.process_" in base]
  assert files, os.listdir(root)
  return files


def _flip_bit(step_dir):
  """One bit flipped in the middle of the largest array file: Orbax reads it without error."""
  path = max(_array_files(step_dir), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x08]))


def _overwrite_bytes(step_dir):
  """64 bytes in the middle of the largest array file overwritten."""
  path = max(_array_files(step_dir), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2 - 32)
    f.write(b"\x5a" * 64)


def _truncate_arrays(step_dir):
  for path in _array_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _empty_item_files(step_dir):
  for base, _, names in os.walk(os.path.join(step_dir, "params")):
    for name in names:
      open(os.path.join(base, name), "wb").close()


def _edit_json(path, old, new):
  """A JSON item's text changed, staying valid JSON."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert old in text, text
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(old, new))


def _edit_data_state(step_dir):
  _edit_json(os.path.join(step_dir, "data", "metadata"), '"cursor": 20', '"cursor": 21')


def _edit_config(step_dir):
  _edit_json(os.path.join(step_dir, "config", "metadata"), '"cfg 20"', '"cfg 21"')


def _delete_data_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "data"))


def _damage_metadata(step_dir):
  """64 bytes of the params item's _METADATA overwritten (not valid UTF-8 any more)."""
  path = os.path.join(step_dir, "params", "_METADATA")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 64)


@pytest.mark.parametrize("damage, reason", [
    (_flip_bit, r"params/dense/kernel does not match its checksum"),
    (_overwrite_bytes, r"params/dense/kernel does not match its checksum"),
    (_truncate_arrays, r"OUT_OF_RANGE|DATA_LOSS|Error reading"),
    (_empty_item_files, r"params metadata"),
    (_edit_data_state, r"data-iterator state does not match its checksum"),
    (_edit_config, r"config text does not match its checksum"),
    (_delete_data_item, r"."),
    (_damage_metadata, r"params metadata: UnicodeDecodeError"),
])
def test_damaged_latest_falls_back_and_says_why_in_one_line(ckpt_dir, caplog, damage, reason):
  damage(os.path.join(ckpt_dir, "20"))
  with checkpoints.Checkpointer(ckpt_dir, keep=3) as ckpt:
    with caplog.at_level(logging.INFO, logger="lm1b.checkpoints"):
      restored = ckpt.restore_latest_valid(ABSTRACT)
    assert restored.step == 10 and restored.config_text == "cfg 10"
    assert restored.data_state == {"epoch": 1, "cursor": 10}
    _assert_tree_equal(restored.items, _items(10))
    (skipped,) = restored.damaged
    assert skipped.step == 20 and re.search(reason, skipped.reason), skipped.reason
    with pytest.raises(checkpoints.CorruptCheckpointError, match=reason) as raised:
      ckpt.restore(ABSTRACT, step=20)
    assert ckpt.all_steps() == [10, 20]  # left in place: only quarantine moves a step
  assert ckpt.step_path(20) in str(raised.value) and "\n" not in str(raised.value)
  assert "See full TensorStore details" not in skipped.reason
  line = checkpoints.describe_damaged(ckpt.directory, restored.damaged)
  assert line.startswith(f"checkpoint {ckpt.step_path(20)} is damaged (") and "\n" not in line
  assert not [r for r in caplog.records if r.name == "lm1b.checkpoints"]  # the caller says it


def test_compatibility_is_checked_on_the_newest_step_with_readable_metadata(ckpt_dir):
  _damage_metadata(os.path.join(ckpt_dir, "20"))
  other = dict(ABSTRACT, params={"dense": dict(
      ABSTRACT["params"]["dense"], bias=jax.ShapeDtypeStruct((47,), jnp.float32))})
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.check_compatible(ABSTRACT) == 10
    with pytest.raises(checkpoints.CorruptCheckpointError, match="params metadata"):
      ckpt.check_compatible(ABSTRACT, step=20)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=ckpt.step_path(10)):
      ckpt.check_compatible(other)  # a configuration problem stays one
    _damage_metadata(ckpt.step_path(10))
    assert ckpt.check_compatible(ABSTRACT) is None


def test_every_step_damaged_raises_one_line(ckpt_dir):
  _flip_bit(os.path.join(ckpt_dir, "10"))
  _truncate_arrays(os.path.join(ckpt_dir, "20"))
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with pytest.raises(checkpoints.CorruptCheckpointError, match="every step") as raised:
      ckpt.restore_latest_valid(ABSTRACT)
  message = str(raised.value)
  assert "step 20: " in message and "step 10: params/dense/kernel" in message
  assert "\n" not in message


def test_quarantine_moves_damaged_steps_aside_and_the_step_is_saved_again(ckpt_dir):
  _flip_bit(os.path.join(ckpt_dir, "20"))
  with checkpoints.Checkpointer(ckpt_dir, keep=3, save_every=10) as ckpt:
    damaged = ckpt.restore_latest_valid(ABSTRACT).damaged
    assert ckpt.quarantine([d.step for d in damaged]) == [str(ckpt_dir / "corrupt" / "20")]
    assert ckpt.all_steps() == [10] and not (ckpt_dir / "20").exists()
    assert (ckpt_dir / "corrupt" / "20" / "params").is_dir()  # moved, not deleted
    assert ckpt.save(20, _items(21), _data_state(21), "cfg 21")
    ckpt.wait()
    restored = ckpt.restore_latest_valid(ABSTRACT)
    assert restored.step == 20 and restored.damaged == []
    _assert_tree_equal(restored.items, _items(21))
    _flip_bit(ckpt.step_path(20))
    assert ckpt.quarantine([20]) == [str(ckpt_dir / "corrupt" / "20.1")]  # name taken: suffix
  with checkpoints.Checkpointer(ckpt_dir) as again:  # a fresh manager sees the same steps
    assert again.all_steps() == [10]


def test_shape_mismatch_is_named_from_metadata_and_not_called_damage(ckpt_dir, caplog):
  _truncate_arrays(os.path.join(ckpt_dir, "20"))  # array data is never read for the check
  other = dict(ABSTRACT, params={"dense": {
      "kernel": jax.ShapeDtypeStruct((32, 48), jnp.float32),
      "bias": jax.ShapeDtypeStruct((48,), jnp.bfloat16),
      "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}})
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with caplog.at_level(logging.ERROR, logger="lm1b.checkpoints"):
      with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        ckpt.restore_latest_valid(other)
    message = str(raised.value)
    assert message.startswith(f"checkpoint {ckpt.step_path(20)} does not match")
    assert "params/dense/kernel: saved (64, 48) float32, now (32, 48) float32" in message
    assert "params/dense/bias: saved (48,) float32, now (48,) bfloat16" in message
    assert "params/dense/extra: not in the checkpoint" in message
    assert "damaged" not in message and "\n" not in message
    assert not caplog.records  # no fallback was tried
    ckpt.check_compatible(ABSTRACT)  # the same shapes pass
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match="opt_state/count: in the checkpoint but not in the model"):
      ckpt.check_compatible({"opt_state": {"mu": ABSTRACT["opt_state"]["mu"]}}, step=10)


def test_read_only_creates_cleans_and_moves_nothing(ckpt_dir, tmp_path):
  in_progress = ckpt_dir / "30.orbax-checkpoint-tmp-99"  # a trainer's save under way
  in_progress.mkdir()
  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as reader:
    assert reader.restore_latest_valid(ABSTRACT).step == 20
    with pytest.raises(checkpoints.CheckpointError, match="opened read-only"):
      reader.save(30, _items(30), {}, "", force=True)
    with pytest.raises(checkpoints.CheckpointError, match="opened read-only"):
      reader.quarantine([20])
  assert in_progress.is_dir() and sorted(os.listdir(ckpt_dir)) == [
      "10", "20", in_progress.name]
  with checkpoints.Checkpointer(tmp_path / "none", read_only=True) as reader:
    assert reader.restore_latest_valid(ABSTRACT) is None
  assert not (tmp_path / "none").exists()


def test_a_step_deleted_while_read_is_gone_not_damaged(ckpt_dir):
  """A reader beside a trainer: the step it lists first is deleted by the trainer's
  retention and a newer one saved; the reader takes the newest, reporting no damage."""
  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as reader:
    assert reader.all_steps() == [10, 20]
    shutil.rmtree(ckpt_dir / "20")
    with checkpoints.Checkpointer(ckpt_dir, async_save=False) as trainer:
      _save_steps(trainer, [30])
    restored = reader.restore_latest_valid(ABSTRACT)
  assert restored.step == 30 and restored.damaged == []


def _fail_json_writes(monkeypatch):
  """Every JSON item write fails as on a full disk (in Orbax's background commit)."""
  async def no_space(self, item, directory):
    del self, item
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)


def test_failed_async_save_is_reported_at_once_and_earlier_steps_stay(ckpt_dir, monkeypatch):
  ckpt = checkpoints.Checkpointer(ckpt_dir, keep=3, save_every=10)
  ckpt.check_for_errors()  # nothing pending: no error
  with monkeypatch.context() as patch:
    _fail_json_writes(patch)
    assert ckpt.save(30, _items(30), _data_state(30), "cfg 30")
    deadline = time.monotonic() + 30
    with pytest.raises(checkpoints.CheckpointWriteError) as raised:
      while time.monotonic() < deadline:  # what a training loop does after each step
        ckpt.check_for_errors()
        time.sleep(0.01)
  message = str(raised.value)
  assert message.startswith(f"saving checkpoint step 30 to {ckpt.step_path(30)} failed: ")
  assert "No space left on device" in message and "\n" not in message
  assert ckpt.all_steps() == [10, 20]
  ckpt.check_for_errors()  # reported once
  assert ckpt.restore_latest_valid(ABSTRACT).step == 20  # earlier steps stay readable
  assert ckpt.save(30, _items(30), _data_state(30), "cfg 30")  # the disk has room again
  ckpt.close()
  assert checkpoints.Checkpointer(ckpt_dir).all_steps() == [10, 20, 30]


_NOISY_SCRIPT = r"""
import errno, logging, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from lm1b import checkpoints, cli
cli.configure_logging("INFO")  # as train.py / eval.py do
logging.getLogger("absl").setLevel(logging.WARNING)
directory, mode = sys.argv[1], sys.argv[2]
sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
def abstract(rows):
  return {"params": {f"w{i}": jax.ShapeDtypeStruct((rows, 8), jnp.float32, sharding=sharding)
                     for i in range(20)}}
rng = np.random.default_rng(0)
items = {"params": {f"w{i}": jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
                    for i in range(20)}}
ckpt = checkpoints.Checkpointer(directory)
if mode == "save":  # two good steps, then a third whose asynchronous write fails
  for step in (1, 2):
    ckpt.save(step, items, {}, "cfg", force=True)
  ckpt.wait()
  async def no_space(self, item, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
  json_checkpoint_handler.JsonCheckpointHandler._save_fn = no_space
  ckpt.save(3, items, {}, "cfg", force=True)
  while True:
    try:
      ckpt.check_for_errors()
      time.sleep(0.01)
    except checkpoints.CheckpointWriteError as error:
      print("write error:", error)
      break
else:  # step 2 is damaged
  restored = ckpt.restore_latest_valid(abstract(64))
  print("restored step", restored.step, checkpoints.describe_damaged(directory, restored.damaged))
  try:
    ckpt.restore_latest_valid(abstract(16))
  except checkpoints.CheckpointMismatchError as error:
    print("mismatch:", error)
  class Finalised:  # its exceptions reach sys.unraisablehook, as TensorStore callbacks' do
    def __init__(self, error):
      self.error = error
    def __del__(self):
      raise self.error
  Finalised(RuntimeError("Event loop is closed"))  # left by Orbax after a failed read
  Finalised(KeyError("other unraisable errors are still shown"))
ckpt.close()
"""


def test_damaged_mismatched_and_failed_checkpoints_print_one_line(tmp_path):
  """stderr of processes restoring damaged or mismatched checkpoints, and of one whose
  asynchronous save fails: our line, no Orbax tracebacks or asyncio noise."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)

  def run(mode):
    result = subprocess.run([sys.executable, "-c", _NOISY_SCRIPT, str(tmp_path), mode],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  saved = run("save")
  assert "write error: saving checkpoint step 3" in saved.stdout
  assert "No space left on device" in saved.stdout and saved.stderr == ""
  _truncate_arrays(os.path.join(tmp_path, "2"))
  restored = run("restore")
  assert "restored step 1" in restored.stdout
  assert "params/w0: saved (64, 8) float32, now (16, 8) float32" in restored.stdout
  assert f"checkpoint {tmp_path}/2 is damaged (" in restored.stdout
  unraisable = restored.stderr.strip().splitlines()
  assert "damaged" not in restored.stderr
  assert "Event loop is closed" not in restored.stderr
  assert "KeyError: 'other unraisable errors are still shown'" in unraisable


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep=0"):
    checkpoints.Checkpointer(tmp_path, keep=0)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="'data'"):
      ckpt.save(1, {"data": {"x": jnp.zeros(2)}}, {}, "", force=True)


def test_summarize_error_names_the_innermost_cause():
  wrapper = RuntimeError("Encountered error ... See full TensorStore details: <bound method>")
  wrapper.__cause__ = ValueError('OUT_OF_RANGE: Error reading "a.k/0.0":\n  byte range [0, 9)')
  assert checkpoints.summarize_error(wrapper) == (
      'ValueError: OUT_OF_RANGE: Error reading "a.k/0.0": byte range [0, 9)')
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ck/3/x")
  assert checkpoints.summarize_error(full) == "No space left on device: /ck/3/x"
  long = ValueError("Error writing " + "x" * 500 + " No space left on device")
  assert checkpoints.summarize_error(long, limit=55) == (
      "ValueError: Error writing ... x No space left on device")


_RESHARD_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lm1b import checkpoints, checksum
assert len(jax.devices()) == 4
devices = np.array(jax.devices())
mesh_a = Mesh(devices, ("data",))
mesh_b = Mesh(devices.reshape(2, 2), ("x", "y"))
x = jnp.arange(32.0).reshape(8, 4)
items = {"params": {"w": jax.device_put(x, NamedSharding(mesh_a, P("data", None))),
                    "v": jax.device_put(x, NamedSharding(mesh_a, P(None, "data")))},
         "train": {"step": jnp.asarray(3, jnp.int32)}}
single = {"params": {"w": x, "v": x}, "train": {"step": jnp.asarray(3, jnp.int32)}}
assert checksum.tree_checksums(items) == checksum.tree_checksums(single)
hlo = checksum._tree_lanes.lower([items["params"]["v"]]).compile().as_text()
assert "all-reduce" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo, hlo
ckpt = checkpoints.Checkpointer(sys.argv[1], async_save=True)
ckpt.save(3, items, {"epoch": np.int64(2)}, "cfg", force=True)
target = NamedSharding(mesh_b, P("y", "x"))
abstract = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target),
                       "v": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target)},
            "train": {"step": jax.ShapeDtypeStruct((), jnp.int32,
                                                   sharding=NamedSharding(mesh_b, P()))}}
restored = ckpt.restore_latest_valid(abstract)  # verified on the other mesh
w = restored.items["params"]["w"]
assert w.sharding == target, w.sharding
np.testing.assert_array_equal(np.asarray(w), np.asarray(x))
assert restored.data_state == {"epoch": 2} and restored.step == 3
ckpt.close()
print("RESHARD_OK")
"""


def test_restore_onto_other_sharding(tmp_path):
  """Saved sharded over 4 simulated devices, restored and verified on another mesh."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT, str(tmp_path / "ck")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0 and "RESHARD_OK" in result.stdout, result.stderr[-3000:]
