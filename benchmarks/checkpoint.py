"""What checksummed checkpoints cost: lm1b.checkpoints vs plain Orbax on the 53M model's state.

The training state of the 53M model (gin/lm1b_53m.gin: 6 layers, d_model 512, d_ff 2048,
8 heads, vocab 32768, max_len 512; float32 parameters and their AdamW state) is saved and
restored through lm1b.checkpoints.Checkpointer (checksums computed on save, shapes checked
from metadata and checksums verified on restore) and through an Orbax CheckpointManager
writing the same items without checksums. The two are interleaved round by round in one
process, each into its own directory, and the medians are compared:

  save, blocking   what the training loop waits for (Orbax copies the arrays to host
                   memory; the checkpointer also computes the checksums first);
  save, total      until the step is on disk (save + wait);
  restore          the whole state, and the parameters alone (what eval.py reads);
  checksums        lm1b.checksum.tree_checksums of the whole state, alone;
  check_for_errors one call, with no save in flight and while one is being written.

  python -m benchmarks.checkpoint [--rounds 3] [--dir /tmp/...]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from benchmarks import common
from lm1b import checkpoints, checksum, optim
from lm1b.model import DecoderLM
from lm1b.model_config import ModelConfig

MODEL_53M = ModelConfig(vocab_size=32768, num_layers=6, num_heads=8, d_model=512, d_ff=2048,
                        max_len=512, block_size=16, dtype="float32")
DATA_STATE = {"epoch": 3, "cursor": 123456, "seed": 0}
CONFIG_TEXT = "ModelConfig.d_model = 512\n" * 40


def training_state(config: ModelConfig) -> dict:
  """{"params", "opt_state", "train"} of a freshly initialised model (float32 arrays)."""
  model = DecoderLM(config)
  tx = optim.make_optimizer(1, schedule=optim.make_schedule(learning_rate=1e-3,
                                                            warmup_steps=10)).tx

  @jax.jit
  def init(rng):
    params = nn.unbox(model.init({"params": rng}, jnp.zeros((1, 16), jnp.int32))["params"])
    return {"params": params, "opt_state": tx.init(params),
            "train": {"step": jnp.zeros((), jnp.int32), "rng": rng}}

  return jax.block_until_ready(init(jax.random.PRNGKey(0)))


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


class PlainOrbax:
  """The same items through an Orbax CheckpointManager, without checksums (the baseline)."""

  def __init__(self, directory: str):
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=1), create=True)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step, items):
    self.manager.save(step, force=True, args=ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
        data=ocp.args.JsonSave(DATA_STATE), config=ocp.args.JsonSave({"gin": CONFIG_TEXT})))

  def wait(self):
    self.manager.wait_until_finished()

  def restore(self, step, abstract_items):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()},
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return {name: restored[name] for name in abstract_items}


class Checksummed:
  """lm1b.checkpoints.Checkpointer with the same interface as PlainOrbax."""

  def __init__(self, directory: str):
    self.checkpointer = checkpoints.Checkpointer(directory, keep=1)

  def save(self, step, items):
    self.checkpointer.save(step, items, DATA_STATE, CONFIG_TEXT, force=True)

  def wait(self):
    self.checkpointer.wait()

  def restore(self, step, abstract_items):
    return self.checkpointer.restore(abstract_items, step).items


def seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure_round(variant, step: int, state: dict, full: dict, params_only: dict) -> dict:
  """Seconds of one save (blocking, total) and the two restores of one variant."""
  start = time.perf_counter()
  variant.save(step, state)
  blocking = time.perf_counter() - start
  variant.wait()
  total = time.perf_counter() - start
  return {"save, blocking": blocking, "save, total": total,
          "restore, whole state": seconds(lambda: variant.restore(step, full)),
          "restore, params only": seconds(lambda: variant.restore(step, params_only))}


def check_for_errors_micros(checkpointer: checkpoints.Checkpointer, state: dict) -> dict:
  """Mean microseconds of check_for_errors: idle, and while a save is being written."""
  def mean_micros(condition):
    calls, start = 0, time.perf_counter()
    while condition() and calls < 100_000:
      checkpointer.check_for_errors()
      calls += 1
    return 1e6 * (time.perf_counter() - start) / max(calls, 1), calls

  idle, _ = mean_micros(lambda: True)
  checkpointer.save(10_000, state, DATA_STATE, CONFIG_TEXT, force=True)
  busy, busy_calls = mean_micros(checkpointer.is_saving)
  checkpointer.wait()
  return {"idle": idle, "during a save": busy, "calls during the save": busy_calls}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "checkpoint.md"))
  args = parser.parse_args()

  scratch = args.dir or tempfile.mkdtemp(prefix="checkpoint_benchmark_")
  state = training_state(MODEL_53M)
  leaves = jax.tree.leaves(state)
  megabytes = sum(leaf.nbytes for leaf in leaves) / 2**20
  print(f"state: {len(leaves)} arrays, {megabytes:.0f} MiB", flush=True)
  full, params_only = abstract(state), {"params": abstract(state["params"])}
  variants = {"plain Orbax": PlainOrbax(os.path.join(scratch, "plain")),
              "checksummed": Checksummed(os.path.join(scratch, "checksummed"))}
  first_checksum = seconds(lambda: checksum.tree_checksums(state))  # includes compilation
  times = {name: [] for name in variants}
  checksum_times = []
  try:
    for step in range(1, args.rounds + 1):
      for name, variant in variants.items():
        times[name].append(measure_round(variant, step, state, full, params_only))
        print(step, name, {k: round(v, 3) for k, v in times[name][-1].items()}, flush=True)
      checksum_times.append(seconds(lambda: checksum.tree_checksums(state)))
    polling = check_for_errors_micros(variants["checksummed"].checkpointer, state)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  rows = []
  for metric in times["plain Orbax"][0]:
    plain = statistics.median(r[metric] for r in times["plain Orbax"])
    ours = statistics.median(r[metric] for r in times["checksummed"])
    rows.append([metric, f"{plain:.2f}", f"{ours:.2f}", f"{ours / plain:.2f}x"])
  checksum_seconds = statistics.median(checksum_times)
  sections = [
      f"State: the 53M model's params + AdamW state, float32: {len(leaves)} arrays, "
      f"{megabytes:.0f} MiB. Medians of {args.rounds} interleaved rounds; each variant "
      "writes its own directory on the same disk (keep 1).", "",
      common.markdown_table(["", "plain Orbax s", "checksummed s", "ratio"], rows), "",
      f"Checksums of the whole state alone (`lm1b.checksum.tree_checksums`): "
      f"{checksum_seconds:.2f} s ({megabytes / checksum_seconds:.0f} MiB/s; first call with "
      f"compilation {first_checksum:.2f} s).", "",
      f"`Checkpointer.check_for_errors()`: {polling['idle']:.1f} us per call with no save in "
      f"flight, {polling['during a save']:.1f} us per call while a save is written "
      f"({polling['calls during the save']} calls).",
  ]
  common.write_report(args.out, "Checkpoint checksums: cost on save and restore", sections)


if __name__ == "__main__":
  main()
