"""Tests for lm1b.partitioning: mesh sizes, rules, shardings (1 and 8 devices)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lm1b import partitioning
from lm1b.model import DecoderLM
from lm1b.model_config import ModelConfig

TINY = ModelConfig(vocab_size=64, num_layers=1, num_heads=2, d_model=32,
                   d_ff=64, max_len=32, block_size=4, dtype="float32")


def _abstract_params(config: ModelConfig):
  return jax.eval_shape(DecoderLM(config).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 4), jnp.int32))["params"]


def test_make_mesh_fills_data_axis_on_one_device():
  mesh = partitioning.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == (1, 1, 1)


@pytest.mark.parametrize("sizes,message", [
    (dict(data=2), "multiply to 2, not the device count 1"),
    (dict(data=-1, fsdp=2), "do not divide the device count 1"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
    (dict(tensor=0), "tensor=0"),
])
def test_make_mesh_rejects_sizes_not_matching_devices(sizes, message):
  with pytest.raises(ValueError, match=message):
    partitioning.make_mesh(**sizes)


def test_state_shardings_follow_logical_rules():
  mesh = partitioning.make_mesh()
  shardings = partitioning.state_shardings(mesh, _abstract_params(TINY))
  block = shardings["block_0"]
  assert shardings["token_embed"]["embedding"].spec == PartitionSpec(
      "tensor", "fsdp")
  assert block["mlp"]["wi"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
  assert block["attention"]["query"]["kernel"].spec == PartitionSpec(
      "fsdp", "tensor", None)
  assert shardings["position_embed"]["embedding"].spec == PartitionSpec(
      None, "fsdp")
  assert partitioning.batch_sharding(mesh).spec == PartitionSpec(
      ("data", "fsdp"))
  assert partitioning.replicated(mesh).spec == PartitionSpec()


def test_state_shardings_replicate_unnamed_leaves():
  mesh = partitioning.make_mesh()
  tree = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
  assert partitioning.state_shardings(mesh, tree)["step"].spec == (
      PartitionSpec())


class FakeDevice:  # pylint: disable=too-few-public-methods
  def __init__(self, process_index: int):
    self.process_index = process_index


def device_grid(shape: tuple[int, int, int], processes: list[int]):
  """[data, fsdp, tensor] object array of FakeDevices owned by `processes` (row-major)."""
  grid = np.empty(len(processes), object)
  grid[:] = [FakeDevice(p) for p in processes]
  return grid.reshape(shape)


@pytest.mark.parametrize("shape, processes, expected", [
    ((2, 2, 2), [0] * 4 + [1] * 4, [(0, 2), (1, 2)]),             # data across processes
    ((1, 4, 2), [1] * 4 + [0] * 4, [(1, 2), (0, 2)]),             # order by first block
    ((1, 1, 8), [0] * 4 + [1] * 4, [(0, 1), (0, 1)]),             # tensor across processes
    ((2, 1, 4), [0, 0, 1, 1, 2, 2, 3, 3], [(0, 2), (0, 2), (1, 2), (1, 2)]),
    ((4, 2, 1), [0, 1] * 4, [(0, 2), (1, 2)]),                    # interleaved blocks
])
def test_batch_shard_of_each_process(shape, processes, expected):
  grid = device_grid(shape, processes)
  got = [partitioning.batch_shard_of(grid, p) for p in sorted(set(processes))]
  assert got == expected


def test_batch_shard_of_rejects_partly_shared_blocks():
  grid = device_grid((2, 1, 2), [0, 1, 1, 1])   # block 0: processes 0 and 1; block 1: 1
  with pytest.raises(ValueError, match="overlapping"):
    partitioning.batch_shard_of(grid, 0)
  assert partitioning.batch_shard(partitioning.make_mesh()) == (0, 1)


EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from lm1b import partitioning
    from lm1b.model import DecoderLM
    from lm1b.model_config import ModelConfig
    assert jax.device_count() == 8, jax.device_count()
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(partitioning.make_mesh(fsdp=2).shape)["data"] == 4
    config = ModelConfig(vocab_size=64, num_layers=1, num_heads=2,
                         d_model=32, d_ff=64, max_len=32, dtype="float32")
    shapes = jax.eval_shape(DecoderLM(config).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 4), jnp.int32))["params"]
    sharding = partitioning.state_shardings(mesh, shapes)
    import flax.linen as nn
    with jax.set_mesh(mesh), nn.logical_axis_rules(
        partitioning.LOGICAL_AXIS_RULES):  # constraints traced at full rank
      jax.eval_shape(DecoderLM(config).init, jax.random.PRNGKey(0),
                     jnp.zeros((8, 4), jnp.int32))
    kernel = sharding["block_0"]["mlp"]["wi"]["kernel"]
    placed = jax.device_put(jnp.zeros((32, 64)), kernel)
    shard_shapes = {s.data.shape for s in placed.addressable_shards}
    batch = jax.device_put(jnp.zeros((8, 3)),
                           partitioning.batch_sharding(mesh))
    batch_shapes = {s.data.shape for s in batch.addressable_shards}
    print("RESULT", sorted(shard_shapes), sorted(batch_shapes))
""")


def test_eight_simulated_devices_mesh_and_sharded_kernel():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env,
                        cwd=root, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "RESULT [(16, 32)] [(2, 3)]" in done.stdout, done.stdout


def test_logical_rules_keep_fsdp_collectives_and_memory_bounded():
  """The tiny model's train step under pure fsdp (1,8,1), compiled with the logical axis rules
  in context (as the pipeline does) and without them (activation constraints inert): with the
  rules, collectives stay under 12 MiB per device per step and temporaries within 1.25x of
  pure data parallelism (8,1,1); without them both bounds break (about 31 MiB and 2.7x)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.sharding", "--gin_file", "gin/tiny.gin",
       "--global_batch", "16", "--mesh", "8,1,1", "--mesh", "1,8,1", "--rules", "both"],
      env=env, cwd=root, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  records = {(r["mesh"], r["rules"]): r for r in map(json.loads, done.stdout.splitlines())}
  data_parallel = records[("8,1,1", True)]["temp_mib_per_device"]
  ruled, inert = records[("1,8,1", True)], records[("1,8,1", False)]
  assert ruled["collective_mib_per_device_step"] < 12 < inert["collective_mib_per_device_step"]
  assert ruled["temp_mib_per_device"] <= 1.25 * data_parallel < inert["temp_mib_per_device"]
