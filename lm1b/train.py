"""Training setup: `train_and_evaluate(config, workdir)` and `prepare_only(config, workdir)`.

Order of work, so that a configuration problem is found before anything is written:

1. the run configuration (lm1b.run_config, already checked when built) gives the optimizer
   and the mesh; the workdir's config.gin (if any) is compared and the data source opened;
2. the workdir is locked and a stop request (SIGTERM/SIGINT) installed; the tokenizer and the
   train and test token caches are prepared (`input_pipeline.prepare_data`, called in
   `_prepare_data` only);
3. the state is restored from the latest readable checkpoint (data-iterator position
   included) or created, directly sharded; config.gin is written;
4. the loop (lm1b.loop): batches are built and put on the devices by a background thread
   while the previous step runs; the periodic actions (log, evaluate, sample, save, check for
   a stop) after each step;
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
from typing import Iterator, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm1b import aot
from lm1b import checkpoints, experiment, flops, input_pipeline, loop, model, optim
from lm1b import partitioning, paths, run_config, sources, storage
from lm1b import throughput as throughput_lib
from lm1b.chief import is_chief
from lm1b.console import say
from lm1b.errors import ConfigError
from lm1b.metrics import MetricWriter
from lm1b.preemption import StopRequest, StopSignal
from lm1b.workdir import Workdir
from lm1b.workdir_lock import WorkdirLock, WorkdirLockedError

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What `train_and_evaluate` returns (handy for tests and notebooks)."""
  step: int
  losses: dict[int, float]          # training loss of every step run by this call
  final_eval: dict | None = None    # full test-split evaluation (None when stopped early)
  unigram_perplexity: float | None = None
  stopped_by: str | None = None     # the signal that stopped the run early
  checkpoint_step: int | None = None  # the latest complete checkpoint when the call returned


@contextlib.contextmanager
def _locked_workdir(workdir: Workdir) -> Iterator[None]:
  """The workdir, held by the chief process's WorkdirLock (created if needed, removed again
  if this run created it and wrote nothing). Every process learns whether the lock was taken,
  so that none waits for a chief that gave up."""
  lock = WorkdirLock(str(workdir), enabled=is_chief(), name=workdir.lock.name)
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


def _check_workdir(workdir: Workdir, config: run_config.RunConfig) -> None:
  """ConfigError (before anything is written) for a workdir that cannot be reached or holds
  another configuration, and for a data root that is not a local directory."""
  storage.check_location(str(workdir), "workdir")
  paths.data_root()
  run_config.check_resume(workdir, config)


def _prepare_data(workdir: Workdir, config: run_config.RunConfig,
                  source: sources.SentenceSource) -> input_pipeline.PreparedData:
  """The run's tokenizer and train and test token caches (the one place training prepares
  data)."""
  return input_pipeline.prepare_data(workdir.tokenizer, source, SPLITS, is_chief=is_chief(),
                                     train_tokenizer=config.tokenizer)


def prepare_only(config: run_config.RunConfig, workdir: Workdir) -> input_pipeline.PreparedData:
  """Prepares the data of a run (tokenizer into the workdir, train and test token caches)
  and writes config.gin, without touching an accelerator (e.g. once on a CPU VM)."""
  _check_workdir(workdir, config)
  source = config.source(splits=SPLITS)
  with _locked_workdir(workdir):
    data = _prepare_data(workdir, config, source)
    workdir.write_config(config.text)
  for split in SPLITS:
    say(f"{split}: {data.descriptions[split]}, {len(data.splits[split].tokens):,} tokens "
        "ready")
  return data


def train_and_evaluate(config: run_config.RunConfig, workdir: Workdir) -> TrainResult:
  """Trains (or resumes) in `workdir`, then evaluates the whole test split.

  Raises ConfigError for configuration problems (before anything is written),
  NonFiniteLossError on a NaN/Inf loss.
  """
  optimizer = config.optimizer(config.loop.num_steps, schedule_options=config.schedule.values)
  mesh = config.mesh()
  config.inputs.check_processes(partitioning.batch_shard(mesh)[1])
  _check_workdir(workdir, config)
  source = config.source(splits=SPLITS)
  say(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es)")
  if aot.precompile_wanted():  # an out-of-memory costs a minute, not a data preparation
    fit = aot.precompile_train_step(config.model, optimizer, mesh, config.inputs.global_batch,
                                    config.inputs.seq_len, config.loop.label_smoothing)
    say(f"train step compiled before data preparation: {aot.describe(fit)}")
  try:
    with _locked_workdir(workdir), StopRequest(config.loop.stop_check_every) as stop:
      return _train_in_workdir(workdir, config, optimizer, mesh, source, stop)
  except StopSignal as stopped:
    say(f"{stopped.signal_name} received before the training loop: stopped")
    return TrainResult(step=0, losses={}, stopped_by=stopped.signal_name,
                       checkpoint_step=_latest_checkpoint(workdir))


class _Start(NamedTuple):
  state: experiment.TrainState
  step: int


def _restore_or_init(workdir: Workdir, config: run_config.RunConfig,
                     spec: experiment.StateSpec, checkpointer: checkpoints.Checkpointer,
                     batches, tokenizer_digest: str) -> _Start:
  """The newest intact checkpoint (damaged newer ones are moved aside, so that their steps
  are saved again; `batches` set to its data position), or a fresh state."""
  restored = checkpointer.restore_latest_valid(experiment.checkpoint_items(spec.abstract))
  if restored is None:
    say(f"starting from scratch in {workdir}")
    return _Start(experiment.init_state(spec, config.loop.seed), 0)
  if restored.damaged:
    moved = checkpointer.quarantine([damaged.step for damaged in restored.damaged])
    say(f"{checkpoints.describe_damaged(checkpointer.directory, restored.damaged)}: "
        f"moved to {', '.join(moved)}; resuming from step {restored.step}")
  problems = run_config.differences_from_checkpoint(
      workdir, checkpointer.step_path(restored.step), restored.config_text,
      restored.tokenizer_digest, tokenizer_digest)
  if problems:  # e.g. another tokenizer.model: resuming would tokenize differently
    raise ConfigError("; ".join(problems) + "; restore them or use a new --workdir")
  batches.restore(restored.data_state)
  say(f"resumed from {checkpointer.step_path(restored.step)} (step {restored.step})")
  return _Start(experiment.state_from_items(restored.items), restored.step)


def _train_in_workdir(workdir: Workdir, config: run_config.RunConfig,
                      optimizer: optim.Optimizer, mesh: jax.sharding.Mesh,
                      source: sources.SentenceSource, stop: StopRequest) -> TrainResult:
  """Steps 2-5 of the module docstring, in a locked workdir."""
  data = _prepare_data(workdir, config, source)
  model_config = experiment.with_vocab(config.model, data.tokenizer.vocab_size)
  say(f"model: {model.count_params(model_config):,} parameters "
      f"({model_config.num_layers} layers, d_model {model_config.d_model}, "
      f"{model_config.attention} attention, vocab {model_config.vocab_size})")
  spec = experiment.make_state_spec(model_config, optimizer, mesh)
  inputs, knobs = config.inputs, config.loop
  with checkpoints.Checkpointer(workdir.checkpoints, keep=knobs.keep_checkpoints,
                                save_every=knobs.checkpoint_every,
                                async_save=knobs.async_checkpoints,
                                quarantine=workdir.quarantine) as checkpointer:
    # Names differing shapes before any write; a damaged newest step is compared past here
    # and moved aside by _restore_or_init.
    checkpointer.check_compatible(experiment.checkpoint_items(spec.abstract))
    if is_chief():
      workdir.write_config(config.text)
    slot = experiment.packing_slot_for(model_config)
    index, count = partitioning.batch_shard(mesh)
    batches = input_pipeline.train_batches(data.splits["train"], inputs, slot=slot,
                                           process_index=index, process_count=count)
    start = _restore_or_init(workdir, config, spec, checkpointer, batches,
                             data.tokenizer.digest())
    throughput = throughput_lib.Throughput(
        inputs.global_batch * inputs.seq_len,
        flops.flops_per_token_for_config(model_config, inputs.seq_len),
        throughput_lib.resolve_peak_flops(knobs.peak_flops_per_device,
                                          model_config.compute_dtype))
    with MetricWriter(workdir.tensorboard, enabled=is_chief(),
                      resume_step=start.step) as writer:
      session = loop.Session(knobs, workdir, data, inputs, spec, checkpointer, writer, stop,
                             batches, slot, throughput, config.text, start.state, start.step)
      with stop.deferred():
        stopped = loop.run_steps(session, loop.actions_for(session))
        final = None if stopped else loop.finish(session)
    checkpointer.wait()
    return TrainResult(
        step=session.step, losses=dict(session.window.losses),
        final_eval=final and final.evaluation,
        unigram_perplexity=final and final.unigram_perplexity,
        stopped_by=None if final is not None else stop.signal_name,
        checkpoint_step=checkpointer.latest_step())


def _latest_checkpoint(workdir: Workdir) -> int | None:
  """The newest complete checkpoint step of `workdir`, None if there is none."""
  if not workdir.checkpoints.is_dir():
    return None
  with checkpoints.Checkpointer(workdir.checkpoints, read_only=True) as checkpointer:
    return checkpointer.latest_step()
