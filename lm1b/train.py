"""The training loop: `train_and_evaluate(workdir, num_steps=...)` (gin-configurable).

Order of work, so that a configuration problem is found before anything is written:

1. every configuration (model, batches, optimizer, mesh, loop knobs) is built and checked, the
   workdir's config.gin (if any) compared, and the data source opened;
2. the workdir is opened and a stop request (SIGTERM/SIGINT) installed; the tokenizer and the
   train and test token caches are prepared (`input_pipeline.prepare_data`);
3. the state is restored from the latest readable checkpoint (data-iterator position
   included) or created, directly sharded; config.gin is written;
4. the loop: batches are built and put on the devices by a background thread while the
   previous step runs; every `log_every` steps the metrics of the window are fetched (the only
   regular host synchronisation besides the stop check every `stop_check_every` steps with
   several processes); evaluation, samples and asynchronous Orbax checkpoints at their
   intervals;
5. at the end: a final checkpoint, the whole test split evaluated into
   workdir/eval_test_<step>.json, and its perplexity printed beside the unigram baseline.

A signal during step 4 or 5 stops at the next agreed step (a checkpoint is saved, a final
evaluation in progress is abandoned); before that, the run unwinds at once. A non-finite loss
raises NonFiniteLossError naming the step; the NaN state is never saved.

Throughput is reported in real tokens (targets with weight 1) per second; `fill` is the share
of token slots (rows x seq_len) that hold real tokens, and MFU is given both on real tokens
and on all slots (the model computes every slot, padding included).
"""

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Iterator

import gin
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lm1b import aot
from lm1b import batches as batches_lib
from lm1b import checkpoints
from lm1b import evaluate
from lm1b import experiment
from lm1b import flops
from lm1b import input_pipeline
from lm1b import metrics as metrics_lib
from lm1b import model as model_lib
from lm1b import optim
from lm1b import partitioning
from lm1b import paths
from lm1b import sampling
from lm1b import sources
from lm1b import steps
from lm1b import storage
from lm1b import throughput as throughput_lib
from lm1b import workdir as workdir_lib
from lm1b.console import is_chief, say
from lm1b.errors import ConfigError
from lm1b.prefetch import Prefetcher
from lm1b.preemption import StopRequest, StopSignal
from lm1b.workdir_lock import WorkdirLock, WorkdirLockedError

_LOG = logging.getLogger(__name__)
SPLITS = ("train", "test")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or parameters; the message names the step."""


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns (handy for tests and notebooks)."""
  step: int
  losses: dict[int, float]          # training loss of every step run by this call
  final_eval: dict | None = None    # full test-split evaluation (None when stopped early)
  unigram_perplexity: float | None = None
  stopped_by: str | None = None     # the signal that stopped the run early
  checkpoint_step: int | None = None  # the latest complete checkpoint when the call returned


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The loop's knobs (the arguments of train_and_evaluate)."""
  num_steps: int
  log_every: int
  eval_every: int
  sample_every: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_max_batches: int | None
  seed: int
  label_smoothing: float
  sample_prompts: tuple[str, ...]
  sample_max_length: int | None
  stop_check_every: int
  peak_flops_per_device: float | None
  async_checkpoints: bool

  def __post_init__(self):
    for name in ("num_steps", "checkpoint_every", "keep_checkpoints", "stop_check_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"train_and_evaluate.{name}={value!r} must be a positive int")
    for name in ("log_every", "eval_every", "sample_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"train_and_evaluate.{name}={value!r} must be an int >= 0 "
                          "(0 disables)")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"train_and_evaluate.label_smoothing={self.label_smoothing!r} must "
                        "be in [0, 1)")


class Trainer:
  """Runs the steps of one train_and_evaluate call; see the module docstring."""

  def __init__(self, workdir: str, loop: LoopConfig, data: input_pipeline.PreparedData,
               input_config: input_pipeline.InputConfig, spec: experiment.StateSpec,
               checkpointer: checkpoints.Checkpointer, config_text: str, stop: StopRequest):
    self.workdir, self.loop, self.data, self.input_config = workdir, loop, data, input_config
    self.spec, self.checkpointer, self.stop = spec, checkpointer, stop
    self.config_text = config_text
    self.model_config = spec.model.config
    self.train_step = steps.make_train_step(spec, label_smoothing=loop.label_smoothing)
    self.evaluator = evaluate.Evaluator(self.model_config, spec.mesh, spec.shardings.params)
    self.writer: metrics_lib.MetricWriter | None = None  # opened once the step is known
    self.batch_sharding = partitioning.batch_sharding(spec.mesh)
    self.shard_index, self.shard_count = partitioning.batch_shard(spec.mesh)
    self.slot = experiment.packing_slot_for(self.model_config)
    self.batches = input_pipeline.train_batches(
        data.splits["train"], input_config, slot=self.slot, process_index=self.shard_index,
        process_count=self.shard_count)
    self.throughput = throughput_lib.Throughput(
        input_config.global_batch * input_config.seq_len,
        flops.flops_per_token_for_config(self.model_config, input_config.seq_len),
        throughput_lib.resolve_peak_flops(loop.peak_flops_per_device, self.model_config.compute_dtype))
    self.state: experiment.TrainState | None = None
    self.step = 0
    self.data_state = self.batches.state()
    self.losses: dict[int, float] = {}
    self._pending: list[tuple[int, dict]] = []
    self._totals: dict[str, float] = {}

  # -- state ---------------------------------------------------------------------------------
  def restore_or_init(self) -> None:
    """The newest intact checkpoint (damaged newer ones are moved aside, so that their steps
    are saved again), or a fresh state; then the TensorBoard writer from that step."""
    restored = self.checkpointer.restore_latest_valid(
        experiment.checkpoint_items(self.spec.abstract))
    if restored is None:
      self.state = experiment.init_state(self.spec, self.loop.seed)
      self.step = 0
      say(f"starting from scratch in {self.workdir}")
    else:
      if restored.damaged:
        moved = self.checkpointer.quarantine([damaged.step for damaged in restored.damaged])
        say(f"{checkpoints.describe_damaged(self.checkpointer.directory, restored.damaged)}: "
            f"moved to {', '.join(moved)}; resuming from step {restored.step}")
      problems = workdir_lib.differences_from_checkpoint(
          self.workdir, self.checkpointer.step_path(restored.step), restored.config_text,
          restored.tokenizer_digest, self.data.tokenizer.digest())
      if problems:  # e.g. another tokenizer.model: resuming would tokenize differently
        raise ConfigError("; ".join(problems) + "; restore them or use a new --workdir")
      self.state = experiment.state_from_items(restored.items)
      self.step = restored.step
      self.batches.restore(restored.data_state)
      self.data_state = self.batches.state()
      say(f"resumed from {self.checkpointer.step_path(restored.step)} (step {restored.step})")
    self.writer = metrics_lib.MetricWriter(
        epath.Path(self.workdir) / workdir_lib.TENSORBOARD_DIR, enabled=is_chief(),
        resume_step=self.step)

  def save(self, *, force: bool = False) -> None:
    """Saves the current step (checked finite first) if due, or always with force."""
    self.drain()
    with self.throughput.untimed():
      started = self.checkpointer.save(self.step, experiment.checkpoint_items(self.state),
                                       self.data_state, self.config_text, force=force,
                                       tokenizer_digest=self.data.tokenizer.digest())
    if started:
      _LOG.info("checkpoint for step %d started", self.step)

  # -- metrics -------------------------------------------------------------------------------
  def drain(self) -> None:
    """Fetches pending step metrics, checks them and adds them to the window's totals.

    Raises NonFiniteLossError naming the first step whose loss or parameters are not finite.
    """
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    pending, self._pending = self._pending, []
    for (step, _), values in zip(pending, fetched):
      loss = float(values["loss_sum"]) / max(float(values["weight_sum"]), 1.0)
      if not values["finite"] or not math.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) or parameters at step {step}; stopped without "
            f"saving it (last checkpoint: step {self.checkpointer.latest_step()} in "
            f"{self.checkpointer.directory})")
      self.losses[step] = loss
      for key in ("loss_sum", "weight_sum", "nll_sum", "grad_norm"):
        self._totals[key] = self._totals.get(key, 0.0) + float(values[key])
      self._totals["steps"] = self._totals.get("steps", 0) + 1
      self._totals["learning_rate"] = float(values["learning_rate"])

  def log(self) -> None:
    """Drains, writes the window's training metrics and prints the progress line."""
    self.drain()
    totals, self._totals = self._totals, {}
    if not totals:
      return
    weight = max(totals["weight_sum"], 1.0)
    values = {
        "loss": totals["loss_sum"] / weight,
        "per_token_perplexity": metrics_lib.perplexity(totals["nll_sum"] / weight),
        "learning_rate": totals["learning_rate"],
        "grad_norm": totals["grad_norm"] / totals["steps"],
    }
    values.update(self.throughput.report(self.step, totals["weight_sum"]))
    self.writer.scalars(self.step, {f"train/{key}": value for key, value in values.items()})
    say(metrics_lib.format_progress(self.step, self.loop.num_steps, values))
    self.throughput.restart(self.step)

  # -- evaluation and samples ----------------------------------------------------------------
  def evaluate(self, max_batches: int | None) -> dict | None:
    """Evaluates the test split (at most max_batches batches); None if a stop abandoned it."""
    self.drain()
    batches = Prefetcher(input_pipeline.eval_batches(
        self.data.splits["test"], self.input_config, slot=self.slot,
        process_index=self.shard_index, process_count=self.shard_count))
    with self.throughput.untimed(), batches:
      result = self.evaluator.run(self.state.params, batches, max_batches=max_batches,
                                  step=self.step, should_stop=self.stop.requested_now)
    if result is None:
      say(f"evaluation at step {self.step} abandoned ({self.stop.signal_name})")
      return None
    self.writer.scalars(self.step, {f"eval/{key}": result[key] for key in (
        "loss", "per_token_perplexity", "per_word_perplexity")})
    scope = "full test split" if max_batches is None else f"{result['sentences']} sentences"
    say(f"eval step {self.step} ({scope}): {evaluate.describe_result(result)}")
    return result

  def sample(self) -> None:
    if jax.process_count() > 1:
      _LOG.info("text samples are skipped in multi-process runs; use sample.py")
      return
    self.drain()
    with self.throughput.untimed(), partitioning.mesh_context(self.spec.mesh):
      texts = sampling.sample_text(
          self.model_config, self.state.params, self.data.tokenizer,
          list(self.loop.sample_prompts), seed=self.loop.seed + self.step, num_samples=1,
          max_length=min(self.loop.sample_max_length or self.input_config.seq_len,
                         self.model_config.max_len), temperature=1.0)
    for prompt, text in zip(self.loop.sample_prompts, texts):
      say(f"sample step {self.step} [{prompt}]: {text}")
    self.writer.text(self.step, "samples", "\n\n".join(texts))

  # -- the loop ------------------------------------------------------------------------------
  def _due(self, every: int) -> bool:
    return every > 0 and self.step % every == 0

  def _global_batches(self) -> Iterator[tuple[dict, dict]]:
    """(global batch arrays, data-iterator state after it), forever."""
    for local in self.batches:
      yield batches_lib.to_global_arrays(local, self.batch_sharding), self.batches.state()

  def run_steps(self) -> bool:
    """Trains until num_steps or an agreed stop request; returns True if stopped by a signal."""
    loop = self.loop
    first_step = self.step
    self.throughput.restart(self.step)
    with Prefetcher(self._global_batches()) as batches:
      while self.step < loop.num_steps:
        batch, self.data_state = next(batches)
        self.state, step_metrics = self.train_step(self.state, batch)
        self.step += 1
        self.checkpointer.check_for_errors()  # a failed asynchronous save stops the run now
        self._pending.append((self.step, step_metrics))
        if self.step == first_step + 1:  # includes compilation: kept out of the timings
          jax.block_until_ready(step_metrics)
          say(f"step {self.step}: compiled and ran the first step in "
              f"{time.perf_counter() - self.throughput.start_time:.1f} s")
          self.throughput.restart(self.step)
        if self._due(loop.log_every) or self.step == loop.num_steps:
          self.log()
        if self._due(loop.eval_every) and self.step < loop.num_steps:
          self.evaluate(loop.eval_max_batches)
        if self._due(loop.sample_every):
          self.sample()
        if self.checkpointer.should_save(self.step):
          self.save()
        if self.stop.requested_at(self.step):
          self.save(force=True)
          say(f"{self.stop.signal_name or 'stop request'}: saved checkpoint at step "
              f"{self.step}, exiting")
          return True
    return False

  def finish(self, result: TrainResult) -> None:
    """Final checkpoint and whole-test-split evaluation into `result` (unless stopped)."""
    self.save(force=True)
    self.checkpointer.wait()
    if self.stop.requested_now():
      result.stopped_by = self.stop.signal_name
      say(f"{self.stop.signal_name}: saved the final checkpoint at step {self.step}; stopped "
          "before the final evaluation (eval.py scores it)")
      return
    result.final_eval = self.evaluate(None)
    if result.final_eval is None:
      result.stopped_by = self.stop.signal_name
      return
    result.final_eval.update(split="test", mode=self.input_config.mode,
                             test_set=self.data.descriptions["test"])
    if jax.process_index() == 0 and (note := workdir_lib.write_result(
        workdir_lib.eval_json_path(self.workdir, "test", self.step), result.final_eval)):
      say(note)
    result.unigram_perplexity = evaluate.unigram_test_perplexity(
        self.data.splits["train"], self.data.splits["test"], self.model_config.vocab_size)
    say(f"final test per-token perplexity {result.final_eval['per_token_perplexity']:.2f} "
        f"(per-word {result.final_eval['per_word_perplexity']:.2f}) vs unigram perplexity "
        f"{result.unigram_perplexity:.2f} of the corpus")

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


@contextlib.contextmanager
def _locked_workdir(workdir: str) -> Iterator[None]:
  """The workdir, held by the chief process's WorkdirLock (created if needed, removed again
  if this run created it and wrote nothing). Every process learns whether the lock was taken,
  so that none waits for a chief that gave up."""
  lock = WorkdirLock(workdir, enabled=is_chief())
  refused = None
  try:
    lock.acquire()
  except WorkdirLockedError as error:
    refused = error
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    flags = multihost_utils.process_allgather(np.array([refused is not None], np.int32))
    if refused is None and flags.max():
      refused = WorkdirLockedError(f"process 0 could not lock {workdir}")
  if refused is not None:
    raise refused
  try:
    yield
  finally:
    lock.release()


def _check_workdir(workdir: str, config_text: str) -> None:
  """ConfigError (before anything is written) for a workdir that cannot be reached or holds
  another configuration, and for a data root that is not a local directory."""
  storage.check_location(workdir, "workdir")
  paths.data_root()
  workdir_lib.check_config(workdir, config_text)


def prepare_only(workdir: str) -> input_pipeline.PreparedData:
  """Prepares the data of a run (tokenizer into the workdir, train and test token caches)
  and writes config.gin, without touching an accelerator (e.g. once on a CPU VM)."""
  workdir = os.fspath(workdir)
  config_text = gin.config_str()
  model_lib.ModelConfig()  # bad model bindings fail here, before anything is written
  input_pipeline.InputConfig()
  _check_workdir(workdir, config_text)
  source = sources.make_source(splits=SPLITS)
  with _locked_workdir(workdir):
    data = input_pipeline.prepare_data(workdir, source, SPLITS)
    workdir_lib.write_config(workdir, config_text)
  for split in SPLITS:
    say(f"{split}: {data.descriptions[split]}, {len(data.splits[split].tokens):,} tokens "
        "ready")
  return data


@gin.configurable(denylist=["workdir"])
def train_and_evaluate(workdir: str, *, num_steps: int = gin.REQUIRED, log_every: int = 50,
                       eval_every: int = 500, sample_every: int = 1000,
                       checkpoint_every: int = 500, keep_checkpoints: int = 3, seed: int = 0,
                       eval_max_batches: int | None = None, label_smoothing: float = 0.0,
                       sample_prompts: tuple[str, ...] = ("the",),
                       sample_max_length: int | None = None, stop_check_every: int = 10,
                       peak_flops_per_device: float | None = None,
                       async_checkpoints: bool = True) -> TrainResult:
  """Trains (or resumes) in `workdir`, then evaluates the whole test split.

  peak_flops_per_device: the dense peak FLOP/s of one device for MFU; default the table in
  lm1b.flops by device kind (no MFU where the kind is unknown, e.g. CPU).
  Raises ConfigError for configuration problems (before anything is written),
  NonFiniteLossError on a NaN/Inf loss.
  """
  workdir = os.fspath(workdir)
  config_text = gin.config_str()
  loop = LoopConfig(num_steps, log_every, eval_every, sample_every, checkpoint_every,
                    keep_checkpoints, eval_max_batches, seed, label_smoothing,
                    tuple(sample_prompts), sample_max_length, stop_check_every,
                    peak_flops_per_device, async_checkpoints)
  model_config = model_lib.ModelConfig()
  input_config = input_pipeline.InputConfig()
  experiment.resolve_model_config(model_config, model_config.vocab_size, input_config.seq_len)
  optimizer = optim.make_optimizer(num_steps)
  mesh = partitioning.make_mesh()
  input_config.check_processes(partitioning.batch_shard(mesh)[1])
  _check_workdir(workdir, config_text)
  source = sources.make_source(splits=SPLITS)
  say(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es)")
  if aot.precompile_wanted():  # an out-of-memory costs a minute, not a data preparation
    fit = aot.precompile_train_step(model_config, optimizer, mesh, input_config.global_batch,
                                    input_config.seq_len, label_smoothing)
    say(f"train step compiled before data preparation: {aot.describe(fit)}")
  try:
    with _locked_workdir(workdir), StopRequest(stop_check_every) as stop:
      result = _train_in_workdir(workdir, loop, model_config, input_config, optimizer, mesh,
                                 source, config_text, stop)
  except StopSignal as stopped:
    say(f"{stopped.signal_name} received before the training loop: stopped")
    result = TrainResult(step=0, losses={}, stopped_by=stopped.signal_name)
  result.checkpoint_step = _latest_checkpoint(epath.Path(workdir) / workdir_lib.CHECKPOINT_DIR)
  return result


def _train_in_workdir(workdir: str, loop: LoopConfig, model_config: model_lib.ModelConfig,
                      input_config: input_pipeline.InputConfig, optimizer: optim.Optimizer,
                      mesh: jax.sharding.Mesh, source: sources.SentenceSource, config_text: str,
                      stop: StopRequest) -> TrainResult:
  """Steps 2-5 of the module docstring, in an opened workdir."""
  data = input_pipeline.prepare_data(workdir, source, SPLITS, is_chief=is_chief())
  model_config = experiment.resolve_model_config(model_config, data.tokenizer.vocab_size,
                                                 input_config.seq_len)
  say(f"model: {model_lib.count_params(model_config):,} parameters "
      f"({model_config.num_layers} layers, d_model {model_config.d_model}, "
      f"{model_config.attention} attention, vocab {model_config.vocab_size})")
  spec = experiment.make_state_spec(model_config, optimizer, mesh)
  with checkpoints.Checkpointer(
      epath.Path(workdir) / workdir_lib.CHECKPOINT_DIR, keep=loop.keep_checkpoints,
      save_every=loop.checkpoint_every, async_save=loop.async_checkpoints) as checkpointer:
    # Names differing shapes before any write; a damaged newest step is compared past here
    # and moved aside by restore_or_init.
    checkpointer.check_compatible(experiment.checkpoint_items(spec.abstract))
    if is_chief():
      workdir_lib.write_config(workdir, config_text)
    trainer = Trainer(workdir, loop, data, input_config, spec, checkpointer, config_text, stop)
    try:
      trainer.restore_or_init()
      with stop.deferred():
        result = TrainResult(step=trainer.step, losses={})
        if trainer.run_steps():
          result.stopped_by = stop.signal_name
        else:
          trainer.finish(result)
    finally:
      trainer.close()
  result.step, result.losses = trainer.step, dict(trainer.losses)
  return result


def _latest_checkpoint(directory: epath.Path) -> int | None:
  """The newest complete checkpoint step in `directory`, None if there is none."""
  if not directory.is_dir():
    return None
  with checkpoints.Checkpointer(directory, read_only=True) as checkpointer:
    return checkpointer.latest_step()
