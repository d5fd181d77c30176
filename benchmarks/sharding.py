"""Memory and communication of the compiled train step on a device mesh (no step is run).

For a gin configuration, a global batch and one or more meshes (data,fsdp,tensor), compiles the
pipeline's own train step (lm1b.steps.make_train_step) for simulated CPU devices and prints one
JSON line per mesh:

  mesh, global_batch, seq_len
  temp_mib_per_device        XLA's temporary buffers (compiled memory analysis)
  param_mib_per_device       the parameters' shards on one device
  state_mib_per_device       parameters + optimizer state shards on one device
  collective_mib_per_device_step
                             bytes moved by the collectives of one step on one device: the
                             result of every all-gather and the operand of every all-reduce,
                             reduce-scatter, all-to-all and collective-permute in the
                             compiled HLO, ops in loops counted once per known trip
  collectives                count of those ops by kind

  python -m benchmarks.sharding --gin_file gin/lm1b_53m.gin --mesh 8,1,1 --mesh 1,8,1 \
      --mesh 2,2,2 --global_batch 64 [--devices 8] [--rules yes|no|both] [--write]

--rules no compiles without the logical axis rules in context (the model's activation
constraints are then no-ops), to show what the rules are worth; both measures each mesh both
ways. --write also writes the table to benchmarks/results/sharding.md.
"""

import argparse
import os
import sys


def _device_count(argv: list[str]) -> int:
  """--devices N from argv (default 8); read before jax is imported."""
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 8


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_device_count(sys.argv[1:])}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from lm1b import cli, experiment, optim, partitioning, run_config, steps  # noqa: E402
from lm1b.hlo_collectives import collective_traffic  # noqa: E402
from lm1b.model_config import ModelConfig  # noqa: E402


def _shard_mib(tree) -> float:
  """MiB of one device's shards of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total / 2**20


def _abstract_batch(mesh, global_batch: int, seq_len: int) -> dict:
  sharding = partitioning.batch_sharding(mesh)
  ints = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sharding)
  return {"inputs": ints, "targets": ints, "positions": ints, "segment_ids": ints,
          "weights": jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32,
                                          sharding=sharding)}


def measure(model_config: ModelConfig, mesh_sizes: tuple[int, int, int],
            global_batch: int, seq_len: int, *, rules: bool = True) -> dict:
  """Compiles the train step for one mesh; returns the JSON record described above."""
  mesh = partitioning.make_mesh(*mesh_sizes)
  spec = experiment.make_state_spec(model_config, optim.make_optimizer(10**9), mesh)
  train_step = steps.make_train_step(spec, label_smoothing=0.0)
  args = (spec.abstract, _abstract_batch(mesh, global_batch, seq_len))
  if rules:
    lowered = train_step.lower(*args)
  else:  # the mesh alone: the model's logical constraints do nothing
    with jax.set_mesh(mesh):
      lowered = train_step.jitted.lower(*args)
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  traffic, counts = collective_traffic(compiled.as_text())
  return {"mesh": ",".join(map(str, mesh_sizes)), "rules": rules,
          "global_batch": global_batch, "seq_len": seq_len,
          "temp_mib_per_device": round(memory.temp_size_in_bytes / 2**20, 1),
          "param_mib_per_device": round(_shard_mib(spec.abstract.params), 1),
          "state_mib_per_device": round(_shard_mib(spec.abstract), 1),
          "collective_mib_per_device_step": round(traffic / 2**20, 1),
          "collectives": counts}


def _mesh(text: str) -> tuple[int, int, int]:
  sizes = tuple(int(x) for x in text.split(","))
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected data,fsdp,tensor")
  return sizes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=None)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--mesh", action="append", type=_mesh, default=None)
  parser.add_argument("--global_batch", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=None,
                      help="default: the configuration's build_inputs.seq_len")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--rules", choices=("yes", "no", "both"), default="yes")
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args(argv)
  files = [cli.resolve_gin_file(f) for f in (args.gin_file or ["gin/lm1b_53m.gin"])]
  cli.parse_gin(files, args.gin_param)
  run = run_config.build()
  model_config = run.model
  seq_len = args.seq_len or run.inputs.seq_len
  records = []
  rules = {"yes": (True,), "no": (False,), "both": (True, False)}[args.rules]
  for sizes in args.mesh or [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
    for with_rules in rules:
      record = measure(model_config, sizes, args.global_batch, seq_len, rules=with_rules)
      print(json.dumps(record), flush=True)
      records.append(record)
  if args.write:
    header = ["mesh (data,fsdp,tensor)", "rules", "temp MiB/device", "params MiB/device",
              "state MiB/device", "collective MiB/device/step", "collective ops"]
    rows = [[r["mesh"], "yes" if r["rules"] else "no", r["temp_mib_per_device"],
             r["param_mib_per_device"], r["state_mib_per_device"],
             r["collective_mib_per_device_step"],
             ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items()))]
            for r in records]
    common.write_report(
        os.path.join(common.RESULTS_DIR, "sharding.md"), "Train-step sharding",
        [f"Configuration: {', '.join(files)}; batch {args.global_batch} x {seq_len}; "
         f"{args.devices} simulated CPU devices.", "", common.markdown_table(header, rows)])


if __name__ == "__main__":
  main()
