"""Tests for lm1b.checkpoints: round trip, retention, async, corrupt-checkpoint fallback."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm1b import checkpoints

# After a failed restore, orbax/tensorstore sometimes completes a future on an asyncio loop
# it has already closed; the RuntimeError is raised in a finaliser and is harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int):
  """Small training-state PyTree with params, an optimizer-like state, step and rng."""
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
  opt_state = {"mu": jax.tree.map(lambda x: x * 0.5, params),
               "count": jnp.asarray(seed, jnp.int32)}
  return {"params": params, "opt_state": opt_state,
          "train": {"step": jnp.asarray(seed, jnp.int32),
                    "rng": jax.random.key_data(jax.random.key(seed))}}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(ckpt, steps):
  for step in steps:
    assert ckpt.save(step, _state(step), {"epoch": step, "index": 7}, f"cfg {step}", force=True)
  ckpt.wait()


def test_round_trip_async(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", keep=2, save_every=5, async_save=True)
  assert ckpt.restore_latest_valid(_abstract(_state(0))) is None
  assert not ckpt.should_save(3) and ckpt.should_save(5)
  assert not ckpt.save(3, _state(3), {}, "x")  # not a save step, not forced
  assert ckpt.save(5, _state(5), {"epoch": 1, "index": 42}, "a = 1\nb = 'x'\n")
  ckpt.wait()
  assert not ckpt.should_save(5) and not ckpt.save(5, _state(6), {}, "", force=True)
  state, data_state, config_text, step = ckpt.restore(_abstract(_state(0)))
  assert step == 5 and data_state == {"epoch": 1, "index": 42}
  assert config_text == "a = 1\nb = 'x'\n"
  _assert_tree_equal(state, _state(5))
  assert state["params"]["dense"]["kernel"].sharding == _abstract(_state(0))[
      "params"]["dense"]["kernel"].sharding
  ckpt.close()
  # A fresh Checkpointer on the same directory sees the step.
  again = checkpoints.Checkpointer(tmp_path / "ckpt", keep=2, async_save=False)
  assert again.latest_step() == 5
  _assert_tree_equal(again.restore_latest_valid(_abstract(_state(0))).items, _state(5))
  again.close()


def test_keep_last_k(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, keep=2, save_every=1, async_save=False)
  _save_steps(ckpt, [1, 2, 3, 4])
  assert ckpt.all_steps() == [3, 4]
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [3, 4]
  _assert_tree_equal(ckpt.restore(_abstract(_state(0)), step=3).items, _state(3))
  with pytest.raises(FileNotFoundError, match="step 1"):
    ckpt.restore(_abstract(_state(0)), step=1)
  ckpt.close()


def _truncate_arrays(step_dir):
  """Halves every array-data chunk of the state item (what a torn copy leaves)."""
  chunks = [os.path.join(root, name)
            for root, _, files in os.walk(os.path.join(step_dir, "state"))
            for name in files if os.sep + "d" + os.sep in os.path.join(root, name)]
  assert chunks
  for path in chunks:
    with open(path, "r+b") as handle:
      handle.truncate(os.path.getsize(path) // 2)


def _empty_state_files(step_dir):
  """Truncates every file of the state item to zero bytes."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      open(os.path.join(root, name), "wb").close()


def _delete_data_item(step_dir):
  for name in os.listdir(os.path.join(step_dir, "data")):
    os.remove(os.path.join(step_dir, "data", name))


@pytest.mark.parametrize("damage", [_truncate_arrays, _empty_state_files, _delete_data_item])
def test_corrupt_latest_falls_back(tmp_path, caplog, damage):
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, async_save=False)
  _save_steps(ckpt, [10, 20])
  damage(ckpt.step_path(20))
  with caplog.at_level(logging.ERROR, logger="lm1b.checkpoints"):
    restored = ckpt.restore_latest_valid(_abstract(_state(0)))
  assert restored.step == 10 and restored.config_text == "cfg 10"
  assert restored.data_state == {"epoch": 10, "index": 7}
  _assert_tree_equal(restored.items, _state(10))
  errors = [r for r in caplog.records if r.name == "lm1b.checkpoints"]
  assert len(errors) == 1 and errors[0].levelno == logging.ERROR
  assert ckpt.step_path(20) in errors[0].getMessage()
  assert "\n" not in errors[0].getMessage()
  ckpt.close()


def test_all_corrupt_raises(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, async_save=False)
  _save_steps(ckpt, [1, 2])
  _truncate_arrays(ckpt.step_path(1))
  _empty_state_files(ckpt.step_path(2))
  with pytest.raises(ValueError, match="unreadable"):
    ckpt.restore_latest_valid(_abstract(_state(0)))
  ckpt.close()


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep=0"):
    checkpoints.Checkpointer(tmp_path, keep=0)


_RESHARD_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lm1b import checkpoints
assert len(jax.devices()) == 4
devices = np.array(jax.devices())
mesh_a = Mesh(devices, ("data",))
mesh_b = Mesh(devices.reshape(2, 2), ("x", "y"))
x = jnp.arange(32.0).reshape(8, 4)
state = {"w": jax.device_put(x, NamedSharding(mesh_a, P("data", None))),
         "step": jnp.asarray(3, jnp.int32)}
ckpt = checkpoints.Checkpointer(sys.argv[1], async_save=True)
ckpt.save(3, state, {"epoch": np.int64(2)}, "cfg", force=True)
target = NamedSharding(mesh_b, P("y", "x"))
abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target),
            "step": jax.ShapeDtypeStruct((), jnp.int32,
                                         sharding=NamedSharding(mesh_b, P()))}
restored = ckpt.restore_latest_valid(abstract)
assert restored.state["w"].sharding == target, restored.state["w"].sharding
np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(x))
assert restored.data_state == {"epoch": 2} and restored.step == 3
ckpt.close()
print("RESHARD_OK")
"""


def test_restore_onto_other_sharding(tmp_path):
  """Saved sharded over 4 simulated devices, restored onto another mesh's sharding."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join(
                 [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                  os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT, str(tmp_path / "ck")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0 and "RESHARD_OK" in result.stdout, result.stderr[-3000:]
