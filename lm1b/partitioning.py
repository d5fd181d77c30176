"""Device mesh and logical-to-mesh sharding rules.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism with
parameters sharded along 'embed'), "tensor" (model parallelism over heads,
MLP hidden units and vocabulary). Batch rows are split over data x fsdp;
`batch_shard` says which rows each process feeds.

Every piece of model code (init, train step, evaluation, sampling) is traced
inside `mesh_context(mesh)`: the mesh and LOGICAL_AXIS_RULES are then in
context, so the model's `nn.with_logical_constraint` calls pin its activations
(batch rows over data x fsdp, heads / MLP units / vocabulary over tensor).
Without the rules those constraints are no-ops and XLA guesses activation
shardings from the parameters, which under fsdp or tensor parallelism costs
gigabytes of collectives per step (see benchmarks/sharding.py).
"""

import contextlib
import math
from typing import Any, Iterator

import numpy as np

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from lm1b.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),  # the stacked layer axis of ModelConfig.scan_layers
)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """The mesh and the logical axis rules in context, for tracing model code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


class MeshJit:
  """`jax.jit(fn, **options)` that is always traced, lowered and run in mesh_context(mesh)."""

  def __init__(self, fn, mesh: jax.sharding.Mesh, **options):
    self.mesh = mesh
    self.jitted = jax.jit(fn, **options)

  def __call__(self, *args):
    with mesh_context(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    """The lowered computation for (abstract) args, e.g. to compile and analyse it."""
    with mesh_context(self.mesh):
      return self.jitted.lower(*args)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """Mesh of shape (data, fsdp, tensor) over all (global) devices.

  At most one size may be -1; it takes the remaining devices. The product
  must equal the device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = (data, fsdp, tensor)
  count = len(devices)
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(f"data={data}, fsdp={fsdp}, tensor={tensor}: the sizes must be "
                      "positive, with at most one -1", owner=make_mesh)
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if count % known:
      raise ConfigError(f"data={data}, fsdp={fsdp}, tensor={tensor}: the sizes do not "
                        f"divide the device count {count}", owner=make_mesh)
    sizes = tuple(count // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != count:
    raise ConfigError(f"data={data}, fsdp={fsdp}, tensor={tensor}: the sizes multiply to "
                      f"{math.prod(sizes)}, not the device count {count}", owner=make_mesh)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows (leading dim) split over ("data", "fsdp"); other dims replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_shard(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(index, count): this process feeds rows block `index` of `count` of every batch.

  See `batch_shard_of`; this is it for the mesh's devices and jax.process_index().
  """
  return batch_shard_of(mesh.devices, jax.process_index())


def batch_shard_of(devices: Any, process_index: int) -> tuple[int, int]:
  """Which rows of a batch sharded by `batch_sharding` a process must feed.

  devices: [data, fsdp, tensor] array of devices (anything with .process_index). The rows
  are cut into data * fsdp blocks; block d * fsdp + f lives on devices[d, f, :]. Processes
  holding the same blocks (a tensor axis across processes) feed the same rows; the `count`
  distinct block sets, ordered by first block, are numbered 0..count-1. Process p then feeds
  rows [index * B / count, (index + 1) * B / count) of a B-row batch, which is what
  lm1b.batches builds with process_index=index, process_count=count, and
  jax.make_array_from_process_local_data places on p's blocks (a row permutation of the
  logical batch when those blocks are not contiguous).

  Raises ValueError when two processes' block sets overlap without being equal.
  """
  devices = np.asarray(devices)
  blocks = devices.reshape(devices.shape[0] * devices.shape[1], -1)
  held: dict[int, set[int]] = {}
  for block, row in enumerate(blocks):
    for device in row:
      held.setdefault(device.process_index, set()).add(block)
  distinct = sorted({frozenset(b) for b in held.values()}, key=min)
  if sum(len(b) for b in distinct) != len(blocks):
    raise ValueError(f"the mesh gives processes overlapping but different batch blocks: "
                     f"{ {p: sorted(b) for p, b in sorted(held.items())} }")
  return distinct.index(frozenset(held[process_index])), len(distinct)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The same full array on every device."""
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(mesh: jax.sharding.Mesh, abstract_state):
  """NamedShardings for a tree whose arrays may be boxed with logical names.

  `abstract_state` is typically `jax.eval_shape` of model/optimizer init,
  still holding `nn.LogicallyPartitioned` boxes; leaves without names are
  replicated. The result has the structure of `nn.unbox(abstract_state)`.
  """
  specs = nn.get_partition_spec(abstract_state)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)

