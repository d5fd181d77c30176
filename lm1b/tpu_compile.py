"""Does a configuration fit a TPU slice? Compiles the pipeline's own programs for a named TPU
topology on any machine with libtpu installed (pip install -r requirements-tpu.txt), no chip
needed:

  python -m lm1b.tpu_compile --topology v5e:2x4 --gin_file gin/lm1b_53m.gin \
      [--gin_param ...] [--global_batch N] [--seq_len L] [--programs train,eval,sample] \
      [--find_max_batch]

The mesh and logical axis rules are the configured ones (make_mesh bindings), built over the
topology's devices. For each program: one human line, then one JSON line (starting with "{")
with topology, device_kind, program, mesh, global_batch, seq_len, argument_bytes, temp_bytes,
output_bytes, alias_bytes, peak_bytes (per device), hbm_bytes (lm1b.hbm), fits,
collective_bytes (per device per step, lm1b.hlo_collectives; for sampling, the decode loop's
body counted once, its trip count depending on the data), model_flops (per step over the
global batch, lm1b.flops; null for sampling) and compile_seconds. XLA's cost analysis is not
reported: its FLOPs leave out loop bodies and its optimal_seconds are negative for loops.

--find_max_batch searches (doubling, then bisection, one compile each) for the largest global
batch whose train step fits, in multiples of the data x fsdp shards.

Exit codes: 0 every program fits, 1 one does not (its line says what it needs, what the chip
has and which knobs help), 2 bad flags, gin bindings or topology (lm1b.cli conventions).
"""

import argparse
import json
import os
import sys
from typing import Sequence

from lm1b import aot, cli, run_config
from lm1b.errors import ConfigError

# libtpu looks for a TPU VM's metadata at start-up unless told what it is, and takes a
# machine-wide lock (/tmp/libtpu_lockfile) that would keep two compile checks from running at
# once; neither matters where no chip is used.
_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost",
               "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` (e.g. "v5e:2x4"); ConfigError when libtpu is missing
  or refuses the name."""
  for key, value in _LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as error:  # pylint: disable=broad-except  (RuntimeError, XlaRuntimeError)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ConfigError(f"--topology {name!r}: no TPU topology of that name here ({first}; "
                      "needs libtpu: pip install -r requirements-tpu.txt)") from error


def _programs(text: str) -> tuple[str, ...]:
  names = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = [p for p in names if p not in aot.PROGRAMS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of "
                                     f"{','.join(aot.PROGRAMS)}")
  return names


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x4, v4:2x2x1")
  parser.add_argument("--gin_file", action="append", default=None,
                      help=f"gin config file (repeatable; default {cli.DEFAULT_GIN_FILE})")
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--global_batch", type=int, default=None,
                      help="default: build_inputs.global_batch (eval_global_batch for eval, "
                           "one row per data x fsdp shard for sample)")
  parser.add_argument("--seq_len", type=int, default=None,
                      help="default: build_inputs.seq_len")
  parser.add_argument("--programs", type=_programs, default=("train",),
                      help="comma-separated, of train,eval,sample (default train)")
  parser.add_argument("--find_max_batch", action="store_true",
                      help="search the largest global batch whose train step fits")
  parser.add_argument("--verbose", action="store_true")
  return parser


def check(topology: str, program: str, config: run_config.RunConfig, mesh,
          global_batch: int, seq_len: int) -> tuple[dict, str | None]:
  """Compiles one program and prints its two lines; (record, the not-fit line or None)."""
  if global_batch < 1 or global_batch % aot.batch_granularity(mesh):
    raise ConfigError(f"global batch {global_batch} must be a positive multiple of the "
                      f"{aot.batch_granularity(mesh)} data x fsdp shards of mesh "
                      f"{dict(mesh.shape)}")
  optimizer = config.optimizer(config.loop.num_steps, schedule_options=config.schedule.values)
  lowered = aot.lower_program(program, config.model, mesh, global_batch, seq_len,
                              optimizer=optimizer, label_smoothing=config.loop.label_smoothing)
  fit = aot.compile_fit(lowered, mesh.devices.flat[0].device_kind)
  result = aot.record(topology, program, mesh, global_batch, seq_len, fit,
                      aot.model_flops(program, config.model, global_batch, seq_len))
  verdict = "fits" if fit.fits else "does NOT fit"
  print(f"{topology} {program} batch {global_batch} x {seq_len} on mesh {dict(mesh.shape)}: "
        f"{verdict}, {aot.describe(fit)}", flush=True)
  print(json.dumps(result), flush=True)
  return result, None if fit.fits else aot.does_not_fit_line(program, fit)


def find_max_batch(topology: str, config: run_config.RunConfig, mesh, seq_len: int,
                   start: int) -> int:
  """Largest global batch (a multiple of the row shards) whose train step fits; 0 if none."""
  unit = aot.batch_granularity(mesh)

  def fits(units: int) -> bool:
    return check(topology, "train", config, mesh, units * unit, seq_len)[1] is None

  low, high = 0, max(start // unit, 1)
  while fits(high):
    low, high = high, high * 2
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  print(f"{topology}: largest global batch whose train step fits at seq_len {seq_len}: "
        f"{low * unit}", flush=True)
  return low * unit


def run(args: argparse.Namespace) -> int:
  """The command, once flags are parsed; returns the exit code (1: something does not fit)."""
  files = [cli.resolve_gin_file(f) for f in (args.gin_file or [cli.DEFAULT_GIN_FILE])]
  cli.parse_gin(files, args.gin_param)
  config = run_config.build()
  inputs = config.inputs
  seq_len = args.seq_len or inputs.seq_len
  if seq_len < 1 or seq_len > config.model.max_len:
    raise ConfigError(f"--seq_len {seq_len} must be in [1, ModelConfig.max_len "
                      f"{config.model.max_len}]")
  mesh = config.mesh(devices=topology_devices(args.topology))
  if args.find_max_batch:
    find_max_batch(args.topology, config, mesh, seq_len,
                   args.global_batch or inputs.global_batch)
    return 0
  failures = []
  for program in args.programs:
    defaults = {"train": inputs.global_batch, "sample": aot.batch_granularity(mesh),
                "eval": inputs.eval_global_batch or inputs.global_batch}
    batch = args.global_batch or defaults[program]
    failures.append(check(args.topology, program, config, mesh, batch, seq_len)[1])
  failures = [line for line in failures if line]
  for line in failures:
    print(f"error: {line}", file=sys.stderr)
  return cli.EXIT_FAILURE if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return run(args)
  except ConfigError as error:
    if args.verbose:
      raise
    print(f"error: {error}", file=sys.stderr)
    return cli.EXIT_CONFIG_ERROR


if __name__ == "__main__":
  sys.exit(main())
