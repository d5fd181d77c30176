"""The training loop: train steps, and after each a sequence of periodic actions.

After every step the actions are asked in order whether they are due (`should_run(step)`) and
run if so:

  LogMetrics     every log_every steps and at the last step: the window's metrics to
                 TensorBoard and the progress line (lm1b.train_metrics, lm1b.throughput)
  Evaluate       every eval_every steps before the last: eval_max_batches test batches
  Sample         every sample_every steps: a text sample per prompt (one-process runs)
  Save           when the Checkpointer's interval is due: an asynchronous checkpoint
  CheckForStop   when the processes agree on a stop request (SIGTERM/SIGINT): a checkpoint,
                 then the loop ends

A step's metrics stay on the device until an action needs them (the window is drained
before anything that reads the state or the clock). `finish` saves the final checkpoint and
evaluates the whole test split. The setup (data, state, checkpointer) is lm1b.train's.
"""

import dataclasses
import logging
import time
from typing import Any, Iterator, Protocol

import jax

from lm1b import batches as batches_lib
from lm1b import checkpoints, evaluate, experiment, input_pipeline, partitioning, sampling
from lm1b import steps
from lm1b import workdir as workdir_lib
from lm1b.chief import is_chief
from lm1b.console import say
from lm1b.loop_config import LoopConfig
from lm1b.metrics import MetricWriter, format_progress
from lm1b.prefetch import Prefetcher
from lm1b.preemption import StopRequest
from lm1b.throughput import Throughput
from lm1b.train_metrics import MetricsWindow

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Session:
  """One training session: the state being trained and what the actions use.

  state/step/data_state advance with every step; the rest is fixed for the session.
  """
  loop: LoopConfig
  workdir: workdir_lib.Workdir
  data: input_pipeline.PreparedData
  inputs: input_pipeline.InputConfig
  spec: experiment.StateSpec
  checkpointer: checkpoints.Checkpointer
  writer: MetricWriter
  stop: StopRequest
  batches: batches_lib.TrainBatches
  slot: batches_lib.Slot
  throughput: Throughput
  config_text: str
  state: experiment.TrainState
  step: int
  window: MetricsWindow = dataclasses.field(default_factory=MetricsWindow)

  def __post_init__(self):
    self.data_state = self.batches.state()
    self.evaluator = evaluate.Evaluator(self.spec.model.config, self.spec.mesh,
                                        self.spec.shardings.params)

  def drain(self) -> None:
    """Fetches and checks the pending step metrics (train_metrics.MetricsWindow.drain)."""
    self.window.drain(lambda: f"step {self.checkpointer.latest_step()} in "
                              f"{self.checkpointer.directory}")

  def save(self, *, force: bool = False) -> None:
    """Saves the current step (checked finite first) if due, or always with force."""
    self.drain()
    with self.throughput.untimed():
      started = self.checkpointer.save(self.step, experiment.checkpoint_items(self.state),
                                       self.data_state, self.config_text, force=force,
                                       tokenizer_digest=self.data.tokenizer.digest())
    if started:
      _LOG.info("checkpoint for step %d started", self.step)

  def evaluate(self, max_batches: int | None) -> dict | None:
    """Evaluates the test split (at most max_batches batches); None if a stop abandoned it."""
    self.drain()
    index, count = partitioning.batch_shard(self.spec.mesh)
    batches = Prefetcher(input_pipeline.eval_batches(
        self.data.splits["test"], self.inputs, slot=self.slot, process_index=index,
        process_count=count))
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


class Action(Protocol):
  """Something the loop does every so many steps."""

  def should_run(self, step: int) -> bool:
    ...

  def run(self, session: Session) -> bool:
    """Does it; True ends the loop."""


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


@dataclasses.dataclass(frozen=True)
class LogMetrics:
  every: int
  num_steps: int

  def should_run(self, step: int) -> bool:
    return _due(step, self.every) or step == self.num_steps

  def run(self, session: Session) -> bool:
    session.drain()
    values = session.window.close()
    if values is None:
      return False
    real_tokens = values.pop("real_tokens")
    values.update(session.throughput.report(session.step, real_tokens))
    session.writer.scalars(session.step, {f"train/{key}": value
                                          for key, value in values.items()})
    say(format_progress(session.step, self.num_steps, values))
    session.throughput.restart(session.step)
    return False


@dataclasses.dataclass(frozen=True)
class Evaluate:
  every: int
  num_steps: int
  max_batches: int | None

  def should_run(self, step: int) -> bool:
    return _due(step, self.every) and step < self.num_steps

  def run(self, session: Session) -> bool:
    session.evaluate(self.max_batches)
    return False


@dataclasses.dataclass(frozen=True)
class Sample:
  every: int
  prompts: tuple[str, ...]
  max_length: int
  seed: int

  def should_run(self, step: int) -> bool:
    return _due(step, self.every)

  def run(self, session: Session) -> bool:
    if jax.process_count() > 1:
      _LOG.info("text samples are skipped in multi-process runs; use sample.py")
      return False
    session.drain()
    with session.throughput.untimed(), partitioning.mesh_context(session.spec.mesh):
      texts = sampling.sample_text(
          session.spec.model.config, session.state.params, session.data.tokenizer,
          list(self.prompts), seed=self.seed + session.step, num_samples=1,
          max_length=self.max_length, temperature=1.0)
    for prompt, text in zip(self.prompts, texts):
      say(f"sample step {session.step} [{prompt}]: {text}")
    session.writer.text(session.step, "samples", "\n\n".join(texts))
    return False


@dataclasses.dataclass(frozen=True)
class Save:
  checkpointer: checkpoints.Checkpointer

  def should_run(self, step: int) -> bool:
    return self.checkpointer.should_save(step)

  def run(self, session: Session) -> bool:
    session.save()
    return False


@dataclasses.dataclass(frozen=True)
class CheckForStop:
  stop: StopRequest

  def should_run(self, step: int) -> bool:
    return self.stop.requested_at(step)

  def run(self, session: Session) -> bool:
    session.save(force=True)
    say(f"{self.stop.signal_name or 'stop request'}: saved checkpoint at step "
        f"{session.step}, exiting")
    return True


def actions_for(session: Session) -> tuple[Action, ...]:
  """The periodic actions of a session's loop, in the order they run after a step."""
  loop, model_config = session.loop, session.spec.model.config
  sample_length = min(loop.sample_max_length or session.inputs.seq_len, model_config.max_len)
  return (LogMetrics(loop.log_every, loop.num_steps),
          Evaluate(loop.eval_every, loop.num_steps, loop.eval_max_batches),
          Sample(loop.sample_every, loop.sample_prompts, sample_length, loop.seed),
          Save(session.checkpointer),
          CheckForStop(session.stop))


def _global_batches(session: Session) -> Iterator[tuple[dict, Any]]:
  """(global batch arrays, data-iterator state after it), forever."""
  sharding = partitioning.batch_sharding(session.spec.mesh)
  for local in session.batches:
    yield batches_lib.to_global_arrays(local, sharding), session.batches.state()


def run_steps(session: Session, actions: tuple[Action, ...]) -> bool:
  """Trains until num_steps or an action ends the loop; returns True if one did (a stop)."""
  train_step = steps.make_train_step(session.spec, label_smoothing=session.loop.label_smoothing)
  first_step = session.step
  session.throughput.restart(session.step)
  with Prefetcher(_global_batches(session)) as batches:
    while session.step < session.loop.num_steps:
      batch, session.data_state = next(batches)
      session.state, step_metrics = train_step(session.state, batch)
      session.step += 1
      session.checkpointer.check_for_errors()  # a failed asynchronous save stops the run now
      session.window.add(session.step, step_metrics)
      if session.step == first_step + 1:  # includes compilation: kept out of the timings
        jax.block_until_ready(step_metrics)
        say(f"step {session.step}: compiled and ran the first step in "
            f"{time.perf_counter() - session.throughput.start_time:.1f} s")
        session.throughput.restart(session.step)
      for action in actions:
        if action.should_run(session.step) and action.run(session):
          return True
  return False


@dataclasses.dataclass(frozen=True)
class Final:
  """The end of a session that was not stopped: the whole test split evaluated."""
  evaluation: dict
  unigram_perplexity: float


def finish(session: Session) -> Final | None:
  """The final checkpoint, then the whole test split evaluated, written to the workdir's
  eval JSON and printed beside the unigram baseline; None if a stop came first."""
  session.save(force=True)
  session.checkpointer.wait()
  if session.stop.requested_now():
    say(f"{session.stop.signal_name}: saved the final checkpoint at step {session.step}; "
        "stopped before the final evaluation (eval.py scores it)")
    return None
  result = session.evaluate(None)
  if result is None:
    return None
  result.update(split="test", mode=session.inputs.mode,
                test_set=session.data.descriptions["test"])
  if is_chief() and (note := workdir_lib.write_result(
      session.workdir.eval_json("test", session.step), result)):
    say(note)
  unigram = evaluate.unigram_test_perplexity(
      session.data.splits["train"], session.data.splits["test"],
      session.spec.model.config.vocab_size)
  say(f"final test per-token perplexity {result['per_token_perplexity']:.2f} "
      f"(per-word {result['per_word_perplexity']:.2f}) vs unigram perplexity "
      f"{unigram:.2f} of the corpus")
  return Final(result, unigram)
