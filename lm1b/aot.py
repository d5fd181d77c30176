"""Ahead-of-time compilation of the pipeline's programs (train step, eval step, sampling loop)
from abstract arguments, and what the compiled program needs per device.

The programs are built by the pipeline's own builders (lm1b.experiment.make_state_spec,
lm1b.steps, lm1b.sampling) over any mesh: the host's devices (train.py compiles its step before
preparing data) or a TPU topology with no chip present (lm1b.tpu_compile). Nothing is
allocated: every argument is a jax.ShapeDtypeStruct carrying its sharding.
"""

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from lm1b import experiment, flops, hbm, hlo_collectives, optim, partitioning, sampling, steps
from lm1b import model_config as model_lib

PROGRAMS = ("train", "eval", "sample")
GIB = 2**30
KNOBS = ("a smaller global batch", "fsdp (--gin_param 'make_mesh.fsdp = N')",
         "rematerialisation (--gin_param 'ModelConfig.remat = \"full\"')")
# libtpu's refusals: "Ran out of memory in memory space hbm. Used 48.88G of 15.75G hbm." and
# "Ran out of memory on HBM, the total memory required for HLO temporaries (144.87G) exceeds
# available HBM (15.75G)."
# One instruction of an HLO module's text: "  %name = type op(...)" or "  ROOT %name = ...".
_INSTRUCTION = re.compile(r"\s+(ROOT )?%?[\w.\-]+ = ")
_REFUSALS = (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
             re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"))
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class DoesNotFitError(ValueError):
  """A compiled program needs more memory per device than the device has (one line)."""


def abstract_batch(mesh: jax.sharding.Mesh, global_batch: int, seq_len: int, *,
                   eval_words: bool = False) -> dict:
  """ShapeDtypeStructs of one global batch as lm1b.steps takes it: int32 [B, L] inputs,
  targets, positions, segment_ids and float32 [B, L] weights (and words for evaluation),
  rows sharded by partitioning.batch_sharding."""
  sharding = partitioning.batch_sharding(mesh)
  ints = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sharding)
  floats = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32, sharding=sharding)
  batch = {"inputs": ints, "targets": ints, "positions": ints, "segment_ids": ints,
           "weights": floats}
  return dict(batch, words=floats) if eval_words else batch


def batch_granularity(mesh: jax.sharding.Mesh) -> int:
  """Global batches must be multiples of this: the data x fsdp shards of the rows."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def lower_program(program: str, model_config: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
                  global_batch: int, seq_len: int, *, optimizer: optim.Optimizer,
                  label_smoothing: float = 0.0):
  """The jax `Lowered` of one program for abstract arguments.

  train: (TrainState, batch [B, L]) -> (TrainState, metrics), the state donated, with the
  configured optimizer (make_optimizer: grad accumulation and all). eval: (params, batch)
  -> sums. sample: the sampling loop of B rows up to L tokens (top_k 0, the `sample.py`
  default), replicated prompts. optimizer: the run's (its schedule length does not change
  the memory).
  """
  spec = experiment.make_state_spec(model_config, optimizer, mesh)
  if program == "train":
    step = steps.make_train_step(spec, label_smoothing=label_smoothing)
    return step.lower(spec.abstract, abstract_batch(mesh, global_batch, seq_len))
  if program == "eval":
    step = steps.make_eval_step(model_config, mesh, spec.shardings.params)
    return step.lower(spec.abstract.params,
                      abstract_batch(mesh, global_batch, seq_len, eval_words=True))
  if program == "sample":
    replicated = partitioning.replicated(mesh)

    def scalar(shape, dtype):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    with partitioning.mesh_context(mesh):
      return sampling._generate.lower(  # pylint: disable=protected-access
          model_config, spec.abstract.params, scalar((global_batch, seq_len), jnp.int32),
          scalar((global_batch,), jnp.int32), scalar((2,), jnp.uint32),
          scalar((), jnp.float32), scalar((), jnp.float32), max_length=seq_len, top_k=0,
          eos_id=sampling.EOS_ID)
  raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")


def model_flops(program: str, model_config: model_lib.ModelConfig, global_batch: int,
                seq_len: int) -> float | None:
  """Model FLOPs of one step of `program` over the whole global batch (lm1b.flops: training
  is 3x the forward); None for sampling (per-token decoding is not what that formula counts)."""
  train = flops.flops_per_token_for_config(model_config, seq_len) * global_batch * seq_len
  return {"train": train, "eval": train / 3}.get(program)


def _bytes_in(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


def refused_bytes(message: str) -> tuple[int, int] | None:
  """(needed, available) bytes per device from libtpu's out-of-memory message, if it is one."""
  for pattern in _REFUSALS:
    match = pattern.search(message)
    if match:
      return _bytes_in(*match.group(1, 2)), _bytes_in(*match.group(3, 4))
  return None


@dataclasses.dataclass
class Fit:
  """What one compiled program needs on one device (bytes); None where not known, e.g. for
  a program the compiler refused (then peak_bytes is what it said it needed)."""
  device_kind: str
  argument_bytes: int | None
  temp_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None
  peak_bytes: int
  hbm_bytes: int | None
  collective_bytes: int | None
  compile_seconds: float
  hlo_instructions: int | None = None  # of the optimized module (all computations)
  refused: bool = False  # by the compiler: out of memory, whatever the bytes say

  @property
  def fits(self) -> bool:
    return not self.refused and (self.hbm_bytes is None or self.peak_bytes <= self.hbm_bytes)


def compile_fit(lowered, device_kind: str) -> Fit:
  """Compiles `lowered`; its memory per device, collective bytes per step and compile time.

  peak_bytes: the larger of XLA's peak_memory_in_bytes and arguments + outputs - aliased +
  temporaries (on TPU either can be the larger: the peak counts generated code, the sum
  counts every temporary buffer as live at once). An out-of-memory refusal by the compiler
  becomes a Fit that does not fit (the needed bytes from its message); other compile errors
  propagate.
  """
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as error:  # pylint: disable=broad-except  (XlaRuntimeError)
    refused = refused_bytes(str(error))
    if refused is None:
      raise
    # The compiler's own usable size (15.75 GiB of a 16 GiB v5e) is the one it refused by.
    return Fit(device_kind, None, None, None, None, refused[0], refused[1], None,
               time.perf_counter() - start, refused=True)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  summed = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  peak = max(getattr(memory, "peak_memory_in_bytes", 0), summed)
  hlo_text = compiled.as_text()
  traffic, _ = hlo_collectives.collective_traffic(hlo_text)
  return Fit(device_kind, memory.argument_size_in_bytes, memory.temp_size_in_bytes,
             memory.output_size_in_bytes, memory.alias_size_in_bytes, peak,
             hbm.hbm_bytes(device_kind), traffic, seconds,
             sum(1 for line in hlo_text.splitlines() if _INSTRUCTION.match(line)))


def does_not_fit_line(program: str, fit: Fit) -> str:
  """One line: what the program needs, what the chip has, and the knobs that would help."""
  return (f"{program} needs {fit.peak_bytes / GIB:.2f} GiB per device, a {fit.device_kind} "
          f"has {fit.hbm_bytes / GIB:.2f} GiB; try {', '.join(KNOBS)}")


def precompile_wanted() -> bool:
  """Whether train.py compiles its step before preparing data: on TPU, or when the
  environment variable HLM1B_PRECOMPILE is 1 (0 turns it off anywhere)."""
  forced = os.environ.get("HLM1B_PRECOMPILE", "")
  return forced == "1" or (forced != "0" and jax.default_backend() == "tpu")


def precompile_train_step(model_config: model_lib.ModelConfig, optimizer: optim.Optimizer,
                          mesh: jax.sharding.Mesh, global_batch: int, seq_len: int,
                          label_smoothing: float) -> Fit:
  """Compiles the train step for the configured vocabulary (before the tokenizer exists);
  raises DoesNotFitError (one line) when it does not fit. With the persistent compilation
  cache the training loop's own compile of the same shapes is then a cache hit."""
  lowered = lower_program("train", model_config, mesh, global_batch, seq_len,
                          label_smoothing=label_smoothing, optimizer=optimizer)
  fit = compile_fit(lowered, mesh.devices.flat[0].device_kind)
  if not fit.fits:
    raise DoesNotFitError(does_not_fit_line("train step", fit))
  return fit


def describe(fit: Fit) -> str:
  """'peak X GiB of Y GiB per device, compiled in Z s'."""
  of = f" of {fit.hbm_bytes / GIB:.2f} GiB" if fit.hbm_bytes else ""
  return (f"peak {fit.peak_bytes / GIB:.2f} GiB{of} per device, compiled in "
          f"{fit.compile_seconds:.1f} s")


def record(topology: str, program: str, mesh: jax.sharding.Mesh, global_batch: int,
           seq_len: int, fit: Fit, flops_per_step: float | None,
           lower_seconds: float | None = None) -> dict[str, Any]:
  """The JSON record of one compiled program (see lm1b.tpu_compile)."""
  return {"topology": topology, "device_kind": fit.device_kind, "program": program,
          "mesh": dict(mesh.shape), "global_batch": global_batch, "seq_len": seq_len,
          "argument_bytes": fit.argument_bytes, "temp_bytes": fit.temp_bytes,
          "output_bytes": fit.output_bytes, "alias_bytes": fit.alias_bytes,
          "peak_bytes": fit.peak_bytes, "hbm_bytes": fit.hbm_bytes, "fits": fit.fits,
          "refused": fit.refused,
          "collective_bytes": fit.collective_bytes, "model_flops": flops_per_step,
          "compile_seconds": round(fit.compile_seconds, 2),
          "lower_seconds": None if lower_seconds is None else round(lower_seconds, 2),
          "hlo_instructions": fit.hlo_instructions}
