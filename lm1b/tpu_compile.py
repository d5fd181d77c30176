"""Does a configuration fit a TPU slice? Compiles the pipeline's own programs for a named TPU
topology on any machine with libtpu installed (pip install -r requirements-tpu.txt), no chip
needed:

  python -m lm1b.tpu_compile --topology v5e:2x4 --gin_file gin/lm1b_53m.gin \
      [--gin_param ...] [--global_batch N] [--seq_len L] [--programs train,eval,sample] \
      [--find_max_batch]

The mesh and logical axis rules are the configured ones (make_mesh bindings), built over the
topology's devices. For each program: one human line, then one JSON line (starting with "{")
with topology, device_kind, program, mesh, global_batch, seq_len, argument_bytes, temp_bytes,
output_bytes, alias_bytes, peak_bytes (per device), hbm_bytes (lm1b.hbm; for a program the
compiler refused, the usable size it refused by), fits, refused (by the compiler),
collective_bytes (per device per step, lm1b.hlo_collectives; for sampling, the decode loop's
body counted once, its trip count depending on the data), model_flops (per step over the
global batch, lm1b.flops; null for sampling), compile_seconds (XLA's TPU compile),
lower_seconds (tracing and lowering to StableHLO before it) and hlo_instructions (of the
compiled module: what the compile time grows with). XLA's cost analysis is not
reported: its FLOPs leave out loop bodies and its optimal_seconds are negative for loops.

--find_max_batch searches for the largest global batch whose train step fits, in multiples of
the data x fsdp shards: each compile's needed bytes predict the next batch to try
(lm1b.fit_search), so a linear memory curve takes 2-4 compiles.

Exit codes: 0 every program fits, 1 one does not (its line says what it needs, what the chip
has and which knobs help), 2 bad flags, gin bindings or topology (lm1b.cli conventions).
"""

import argparse
import json
import sys
import time
from typing import Sequence

from lm1b import aot, cli, fit_search, run_config, tpu_topology
from lm1b.errors import ConfigError


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` ("v5e:2x4", "v4-8", lm1b.tpu_topology); ConfigError
  naming --topology when libtpu is missing or refuses the name."""
  try:
    return tpu_topology.devices(name)
  except tpu_topology.TopologyError as error:
    raise ConfigError(f"--topology {name!r}: {error}") from error


def _programs(text: str) -> tuple[str, ...]:
  names = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = [p for p in names if p not in aot.PROGRAMS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of "
                                     f"{','.join(aot.PROGRAMS)}")
  return names


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", required=True,
                      help="TPU topology: a layout (v5e:2x4, v4:2x2x1) or an accelerator type "
                           "(v5litepod-8, v4-8, v5p-16, v6e-8)")
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
  start = time.perf_counter()
  lowered = aot.lower_program(program, config.model, mesh, global_batch, seq_len,
                              optimizer=optimizer, label_smoothing=config.loop.label_smoothing)
  lower_seconds = time.perf_counter() - start
  fit = aot.compile_fit(lowered, mesh.devices.flat[0].device_kind)
  result = aot.record(topology, program, mesh, global_batch, seq_len, fit,
                      aot.model_flops(program, config.model, global_batch, seq_len),
                      lower_seconds)
  verdict = "fits" if fit.fits else "does NOT fit"
  print(f"{topology} {program} batch {global_batch} x {seq_len} on mesh {dict(mesh.shape)}: "
        f"{verdict}, {aot.describe(fit)}", flush=True)
  print(json.dumps(result), flush=True)
  return result, None if fit.fits else aot.does_not_fit_line(program, fit)


def find_max_batch(topology: str, config: run_config.RunConfig, mesh, seq_len: int,
                   start: int, limit: int = 2**20) -> tuple[int, list[fit_search.Need]]:
  """Largest global batch (a multiple of the row shards, at most `limit`) whose train step
  fits, 0 if none; and the compiles' measurements. Each compile's needed bytes steer the
  next (lm1b.fit_search)."""
  unit = aot.batch_granularity(mesh)

  def measure(batch: int) -> fit_search.Need:
    record, _ = check(topology, "train", config, mesh, batch, seq_len)
    return fit_search.Need(batch, record["peak_bytes"], record["hbm_bytes"],
                           record["argument_bytes"], record["refused"])

  candidates = range(unit, max(limit, unit) + 1, unit)
  largest, points = fit_search.largest_fitting(measure, candidates, start)
  print(f"{topology}: largest global batch whose train step fits at seq_len {seq_len}: "
        f"{largest} ({len(points)} compiles)", flush=True)
  return largest, points


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
