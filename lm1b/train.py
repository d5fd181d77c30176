"""The training loop: sharded train step, metrics, evaluation, samples, checkpoints, resume.

`train_and_evaluate(workdir, num_steps=...)` (gin-configurable) trains `DecoderLM` on the
batches of `lm1b.input_pipeline.build_inputs`, on the mesh of `lm1b.partitioning.make_mesh`:

* the TrainState (params, opt_state, step, rng) is created directly with the shardings that
  the parameters' logical axis names map to; the train step is one `jax.jit` with explicit
  in/out shardings and the state donated;
* every `log_every` steps: loss, per-token perplexity, learning rate, gradient norm, tokens/s
  (non-padding targets), step time and MFU go to TensorBoard (process 0) and a console line;
* every `eval_every` steps an evaluation on the test split (at most `eval_max_batches`
  batches), every `sample_every` steps text samples, every `checkpoint_every` steps an
  asynchronous Orbax checkpoint (state, data-iterator state, gin config; last K kept);
* an existing checkpoint is resumed automatically, data iterator included, so an interrupted
  run continues exactly as an uninterrupted one would;
* SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, the function returns;
* a non-finite loss or parameters raise NonFiniteLossError naming the step; the NaN state is
  never saved and earlier checkpoints stay as they were;
* with several processes (jax.distributed), each feeds only its rows of every global batch
  (lm1b.partitioning.batch_shard, assembled with jax.make_array_from_process_local_data),
  process 0 trains the tokenizer before the others load it, and only process 0 prints and
  writes TensorBoard summaries, config.gin and eval JSON (Orbax coordinates checkpoints);
* at the end: a final checkpoint, the whole test split evaluated into
  workdir/eval_test_<step>.json, and that perplexity printed next to the corpus's unigram
  perplexity.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Iterator

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lm1b import batches as batches_lib
from lm1b import checkpoints
from lm1b import evaluate
from lm1b import flops
from lm1b import input_pipeline
from lm1b import metrics as metrics_lib
from lm1b import model as model_lib
from lm1b import optim
from lm1b import partitioning
from lm1b import sampling

_LOG = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or parameters; the message names the step."""


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data-iterator state.

  params: float32 parameter tree; opt_state: optax state; step: int32 [] (updates done);
  rng: uint32 [2] raw PRNG key (dropout keys are fold_in(rng, step)).
  """
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """How to build, shard and restore a TrainState for one model/optimizer/mesh."""
  model: model_lib.DecoderLM
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  shardings: TrainState   # of NamedSharding
  abstract: TrainState    # of jax.ShapeDtypeStruct carrying .sharding
  seq_len: int


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns (handy for tests and notebooks)."""
  step: int
  losses: dict[int, float]          # training loss of every step run by this call
  final_eval: dict | None = None    # full test-split evaluation (None when stopped early)
  unigram_perplexity: float | None = None
  stopped_by_signal: bool = False


def say(message: str) -> None:
  """A user-facing line: printed (flushed) on process 0 and logged on every process."""
  if jax.process_index() == 0:
    print(message, flush=True)
  _LOG.debug(message)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """The mesh in context while tracing model code.

  The logical axis rules are deliberately not put in context: flax's apply re-traces each
  parameter's initializer to check its shape, and with rules and a mesh in context
  DenseGeneral's flattened-kernel initializer gets its 3-D kernel's sharding constraint
  (ValueError: rank mismatch). Without rules the model's activation constraints are no-ops
  and XLA propagates shardings from the explicitly sharded parameters and batch.
  """
  with jax.set_mesh(mesh):
    yield


CONFIG_FILE = "config.gin"
# Bindings that may change when a run is resumed (loop lengths, logging, device layout).
RESUMABLE_SELECTORS = ("train_and_evaluate.", "make_mesh.")


def config_bindings(text: str) -> dict[str, str]:
  """{'selector.param': 'value'} of a gin.config_str() text (continuation lines joined)."""
  bindings, key = {}, None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if line[0].isspace() and key is not None:
      bindings[key] += " " + line.strip()
      continue
    key, _, value = line.partition("=")
    key = key.strip()
    bindings[key] = value.strip()
  return bindings


def check_config(workdir: str, config_text: str) -> None:
  """Raises ValueError if workdir/config.gin is from a run with other model/data settings.

  Only bindings of train_and_evaluate (loop lengths, logging) and make_mesh may differ.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    old = config_bindings(f.read())
  new = config_bindings(config_text)
  changed = sorted(key for key in set(old) | set(new)
                   if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_SELECTORS))
  if changed:
    raise ValueError(f"{path} is from a run with a different configuration (differs in "
                     f"{', '.join(changed)}); use a new --workdir or the same settings")


def write_config(workdir: str, config_text: str) -> None:
  """Writes workdir/config.gin atomically (process 0 only)."""
  if jax.process_index() == 0:
    evaluate.write_text_atomic(os.path.join(workdir, CONFIG_FILE), config_text)


def batch_mode() -> str:
  """The gin-bound batch mode of build_inputs ("sentence" or "packed")."""
  return gin.get_bindings(input_pipeline.build_inputs).get("mode", "sentence")


def build_process_inputs(workdir: str, mesh: jax.sharding.Mesh) -> input_pipeline.Inputs:
  """The gin-configured inputs, with this process's rows (see partitioning.batch_shard).

  With several processes, process 0 goes first: it trains the tokenizer into the (shared)
  workdir and fills the token cache, which the others then load, so all use one tokenizer.
  """
  index, count = partitioning.batch_shard(mesh)
  build = functools.partial(input_pipeline.build_inputs, workdir, process_index=index,
                            process_count=count)
  if jax.process_count() == 1:
    return build()
  inputs = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("lm1b: tokenizer and token cache ready")
  return inputs if inputs is not None else build()


def eval_batches(inputs: input_pipeline.Inputs, split: str,
                 mesh: jax.sharding.Mesh) -> Iterator[dict]:
  """This process's rows of the eval batches covering the whole `split`."""
  index, count = partitioning.batch_shard(mesh)
  return batches_lib.eval_batches(
      inputs.eval_split(split), global_batch=inputs.eval_global_batch, seq_len=inputs.seq_len,
      process_index=index, process_count=count)


def build_model_config(vocab_size: int, seq_len: int) -> model_lib.ModelConfig:
  """The gin-bound ModelConfig with vocab_size taken from the tokenizer, checked vs batches."""
  config = model_lib.ModelConfig()
  if config.vocab_size != vocab_size:
    _LOG.info("ModelConfig.vocab_size %d replaced by the tokenizer's %d",
              config.vocab_size, vocab_size)
    config = dataclasses.replace(config, vocab_size=vocab_size)
  if config.max_len < seq_len:
    raise ValueError(f"ModelConfig.max_len={config.max_len} is shorter than the batches' "
                     f"seq_len={seq_len}")
  return config


def build_optimizer(num_steps: int) -> tuple[optax.GradientTransformation, Any, int]:
  """(tx, schedule, grad_accum_steps) from the gin bindings of lm1b.optim.

  The cosine schedule's total_steps defaults to the number of optimizer updates of the run.
  """
  accum = int(gin.get_bindings(optim.make_optimizer).get("grad_accum_steps", 1))
  kwargs = {}
  if "total_steps" not in gin.get_bindings(optim.make_schedule):
    kwargs["total_steps"] = max(num_steps // accum, 1)
  schedule = optim.make_schedule(**kwargs)
  return optim.make_optimizer(schedule), schedule, accum


def make_state_spec(model_config: model_lib.ModelConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, seq_len: int) -> StateSpec:
  """Shapes and shardings of the TrainState, from jax.eval_shape (nothing allocated)."""
  model = model_lib.DecoderLM(model_config)
  boxed = jax.eval_shape(lambda: _init_boxed(model, tx, jax.random.PRNGKey(0), seq_len))
  shardings = partitioning.state_shardings(mesh, boxed)
  abstract = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      nn.unbox(boxed), shardings)
  return StateSpec(model, tx, mesh, shardings, abstract, seq_len)


def _init_boxed(model: model_lib.DecoderLM, tx: optax.GradientTransformation,
                rng: jax.Array, seq_len: int) -> TrainState:
  """A fresh TrainState whose parameters (and their optimizer slots) keep logical names."""
  params_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init({"params": params_rng}, tokens)["params"]
  return TrainState(params=params, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), rng=state_rng)


def init_state(spec: StateSpec, seed: int) -> TrainState:
  """A fresh TrainState created directly with its shardings (jitted init)."""
  def init(rng):
    return nn.unbox(_init_boxed(spec.model, spec.tx, rng, spec.seq_len))
  # No logical-rules context here: flax would constrain DenseGeneral's flattened kernels
  # with their unflattened names; out_shardings places the arrays.
  return jax.jit(init, out_shardings=spec.shardings)(jax.random.PRNGKey(seed))


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def make_train_step(spec: StateSpec, schedule: Any, *, label_smoothing: float,
                    grad_accum_steps: int):
  """The jitted step (state, batch) -> (state, metrics); the state is donated.

  batch: global arrays inputs/targets/positions/segment_ids int32 [B, L], weights f32 [B, L].
  metrics (replicated f32 scalars): loss_sum, weight_sum, nll_sum, grad_norm,
  learning_rate, finite (1.0 when the loss and new parameters are all finite).
  """
  model = spec.model

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], deterministic=False,
                           rngs={"dropout": dropout_rng})
      loss_sum, weight_sum, nll_sum = optim.cross_entropy_loss(
          logits, batch["targets"], batch["weights"], label_smoothing)
      return loss_sum / jnp.maximum(weight_sum, 1.0), (loss_sum, weight_sum, nll_sum)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (loss_sum, weight_sum, nll_sum)), grads = grad_fn(state.params)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss_sum) & _all_finite(params)
    metrics = {
        "loss_sum": loss_sum, "weight_sum": weight_sum, "nll_sum": nll_sum,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step // grad_accum_steps),
        "finite": finite.astype(jnp.float32),
    }
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics

  replicated = partitioning.replicated(spec.mesh)
  return jax.jit(train_step,
                 in_shardings=(spec.shardings, partitioning.batch_sharding(spec.mesh)),
                 out_shardings=(spec.shardings, replicated), donate_argnums=(0,))


class StopRequest:
  """SIGTERM/SIGINT handler (main thread only) that asks the loop to stop after a step.

  A second SIGINT raises KeyboardInterrupt. With several processes, `requested()` is agreed
  through an all-gather so that every host stops at the same step.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    _LOG.warning("%s received: stopping after the current step", self.signal_name)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def requested(self) -> bool:
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.max(flags))


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The loop's knobs (the arguments of train_and_evaluate)."""
  num_steps: int
  log_every: int
  eval_every: int
  sample_every: int
  checkpoint_every: int
  eval_max_batches: int | None
  seed: int
  sample_prompts: tuple[str, ...]
  sample_max_length: int


class Trainer:
  """Runs the steps of one train_and_evaluate call; see the module docstring."""

  def __init__(self, workdir: str, loop: LoopConfig, inputs: input_pipeline.Inputs,
               model_config: model_lib.ModelConfig, spec: StateSpec, train_step,
               checkpointer: checkpoints.Checkpointer, config_text: str):
    self.workdir, self.loop, self.inputs = workdir, loop, inputs
    self.model_config, self.spec, self.train_step = model_config, spec, train_step
    self.checkpointer, self.config_text = checkpointer, config_text
    self.evaluator = evaluate.Evaluator(model_config, spec.mesh, spec.shardings.params)
    self.writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"),
                                           enabled=jax.process_index() == 0)
    self.batch_sharding = partitioning.batch_sharding(spec.mesh)
    self.flops_per_position = flops.flops_per_token_for_config(model_config, inputs.seq_len)
    self.peak_flops = flops.system_peak_flops(model_config.compute_dtype)
    self.state: TrainState | None = None
    self.step = 0
    self.losses: dict[int, float] = {}
    self._pending: list[tuple[int, dict]] = []
    self._totals: dict[str, float] = {}
    self._window_start = (0, time.perf_counter())
    self._excluded_time = 0.0
    self._positions_per_step = 0

  # -- state ---------------------------------------------------------------------------------
  def restore_or_init(self) -> None:
    restored = self.checkpointer.restore_latest_valid(self.spec.abstract)
    if restored is None:
      self.state = init_state(self.spec, self.loop.seed)
      self.step = 0
      say(f"starting from scratch in {self.workdir}")
      return
    self.state, self.step = restored.state, restored.step
    self.inputs.train.restore(restored.data_state)
    say(f"resumed from {self.checkpointer.step_path(restored.step)} (step {restored.step})")

  def save(self, *, force: bool = False) -> None:
    """Saves the current step (checked finite first) if due, or always with force."""
    self.drain()
    with self._untimed():
      started = self.checkpointer.save(self.step, self.state, self.inputs.train.state(),
                                       self.config_text, force=force)
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
    steps = [s for s, _ in self._pending]
    self._pending = []
    for step, values in zip(steps, fetched):
      loss = float(values["loss_sum"]) / max(float(values["weight_sum"]), 1.0)
      if not values["finite"] or not math.isfinite(loss):
        last = self.checkpointer.latest_step()
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) or parameters at step {step}; stopped without "
            f"saving it (last checkpoint: step {last} in {self.checkpointer.directory})")
      self.losses[step] = loss
      for key in ("loss_sum", "weight_sum", "nll_sum", "grad_norm"):
        self._totals[key] = self._totals.get(key, 0.0) + float(values[key])
      self._totals["steps"] = self._totals.get("steps", 0) + 1
      self._totals["learning_rate"] = float(values["learning_rate"])

  def _restart_window(self) -> None:
    self._window_start = (self.step, time.perf_counter())
    self._excluded_time = 0.0

  @contextlib.contextmanager
  def _untimed(self) -> Iterator[None]:
    """Time spent inside (evaluation, samples, the first step's compilation) is not counted."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded_time += time.perf_counter() - start

  def log(self) -> None:
    """Drains, writes the window's training metrics and prints the progress line."""
    self.drain()
    totals, self._totals = self._totals, {}
    if not totals:
      return
    start_step, start_time = self._window_start
    elapsed = time.perf_counter() - start_time - self._excluded_time
    timed_steps = self.step - start_step
    weight = max(totals["weight_sum"], 1.0)
    values = {
        "train/loss": totals["loss_sum"] / weight,
        "train/per_token_perplexity": metrics_lib.perplexity(totals["nll_sum"] / weight),
        "train/learning_rate": totals["learning_rate"],
        "train/grad_norm": totals["grad_norm"] / totals["steps"],
    }
    progress = {"loss": values["train/loss"], "perplexity": values["train/per_token_perplexity"],
                "learning_rate": values["train/learning_rate"]}
    steps_per_sec = 0.0
    if timed_steps > 0 and elapsed > 0:
      steps_per_sec = timed_steps / elapsed
      tokens_per_step = totals["weight_sum"] / totals["steps"]
      mfu = flops.mfu(self._positions_per_step * steps_per_sec, self.flops_per_position,
                      self.peak_flops)
      values["train/tokens_per_sec"] = progress["tokens_per_sec"] = (
          tokens_per_step * steps_per_sec)
      values["train/step_time_sec"] = 1.0 / steps_per_sec
      if math.isfinite(mfu):
        values["train/mfu"] = progress["mfu"] = mfu
    self.writer.scalars(self.step, values)
    say(metrics_lib.format_progress(self.step, self.loop.num_steps, progress, steps_per_sec))
    self._restart_window()

  # -- evaluation and samples ----------------------------------------------------------------
  def evaluate(self, max_batches: int | None) -> dict:
    """Evaluates the test split (at most max_batches batches); writes and prints it."""
    self.drain()
    with self._untimed():
      result = self.evaluator.run(self.state.params,
                                  eval_batches(self.inputs, "test", self.spec.mesh),
                                  max_batches=max_batches, step=self.step)
    self.writer.scalars(self.step, {
        "eval/loss": result["loss"], "eval/per_token_perplexity": result["per_token_perplexity"],
        "eval/per_word_perplexity": result["per_word_perplexity"]})
    scope = "full test split" if max_batches is None else f"{result['sentences']} sentences"
    say(f"eval step {self.step} ({scope}): loss {result['loss']:.4f} | per-token ppl "
        f"{result['per_token_perplexity']:.2f} | per-word ppl "
        f"{result['per_word_perplexity']:.2f}")
    return result

  def sample(self) -> None:
    if jax.process_count() > 1:
      _LOG.info("text samples are skipped in multi-process runs; use sample.py")
      return
    self.drain()
    with self._untimed():
      texts = self._sample_texts()
    for prompt, text in zip(self.loop.sample_prompts, texts):
      say(f"sample step {self.step} [{prompt}]: {text}")
    self.writer.text(self.step, "samples", "\n\n".join(texts))

  def _sample_texts(self) -> list[str]:
    return sampling.sample_text(
        self.model_config, self.state.params, self.inputs.tokenizer,
        list(self.loop.sample_prompts), seed=self.loop.seed + self.step, num_samples=1,
        max_length=self.loop.sample_max_length, temperature=1.0)

  # -- the loop ------------------------------------------------------------------------------
  def _due(self, every: int) -> bool:
    return every > 0 and self.step % every == 0

  def run_steps(self, stop: StopRequest) -> bool:
    """Trains until num_steps or a stop request; returns True if stopped by a signal."""
    loop = self.loop
    first_step = self.step
    self._restart_window()
    while self.step < loop.num_steps:
      local = next(self.inputs.train)
      batch = batches_lib.to_global_arrays(local, self.batch_sharding)
      self._positions_per_step = batch["inputs"].size
      with sharding_context(self.spec.mesh):
        self.state, step_metrics = self.train_step(self.state, batch)
      self.step += 1
      self._pending.append((self.step, step_metrics))
      if self.step == first_step + 1:  # includes compilation: kept out of the timings
        jax.block_until_ready(step_metrics)
        say(f"step {self.step}: compiled and ran the first step in "
            f"{time.perf_counter() - self._window_start[1]:.1f} s")
        self._restart_window()
      if self._due(loop.log_every) or self.step == loop.num_steps:
        self.log()
      if self._due(loop.eval_every) and self.step < loop.num_steps:
        self.evaluate(loop.eval_max_batches)
      if self._due(loop.sample_every):
        self.sample()
      if self.checkpointer.should_save(self.step):
        self.save()
      if stop.requested():
        self.save(force=True)
        say(f"{stop.signal_name or 'stop request'}: saved checkpoint at step {self.step}, "
            "exiting")
        return True
    return False

  def close(self) -> None:
    self.writer.close()


def unigram_test_perplexity(train_split, test_split, vocab_size: int) -> float:
  """Perplexity on the test targets of a unigram model counted on the train split.

  Targets are every sentence's token ids plus its EOS; counts are add-one smoothed.
  """
  from lm1b.tokenizer import EOS_ID  # pylint: disable=import-outside-toplevel
  counts = np.bincount(np.asarray(train_split.tokens), minlength=vocab_size)
  counts = counts[:vocab_size].astype(np.float64) + 1.0
  counts[EOS_ID] += len(train_split)
  log_probs = np.log(counts / counts.sum())
  test_tokens = np.asarray(test_split.tokens)
  total = log_probs[test_tokens].sum() + len(test_split) * log_probs[EOS_ID]
  return metrics_lib.perplexity(-total / (len(test_tokens) + len(test_split)))


@gin.configurable(denylist=["workdir"])
def train_and_evaluate(workdir: str, *, num_steps: int = gin.REQUIRED, log_every: int = 50,
                       eval_every: int = 500, sample_every: int = 1000,
                       checkpoint_every: int = 500, keep_checkpoints: int = 3, seed: int = 0,
                       eval_max_batches: int | None = None, label_smoothing: float = 0.0,
                       sample_prompts: tuple[str, ...] = ("the",),
                       sample_max_length: int | None = None,
                       async_checkpoints: bool = True) -> TrainResult:
  """Trains (or resumes) in `workdir`, then evaluates the whole test split.

  Raises NonFiniteLossError on a NaN/Inf loss, ValueError if workdir/config.gin holds a
  different configuration.
  """
  workdir = os.fspath(workdir)
  config_text = gin.config_str()
  check_config(workdir, config_text)
  mesh = partitioning.make_mesh()
  say(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es)")
  tx, schedule, accum = build_optimizer(num_steps)  # bad optimizer bindings fail before I/O
  inputs = build_process_inputs(workdir, mesh)
  model_config = build_model_config(inputs.tokenizer.vocab_size, inputs.seq_len)
  say(f"model: {model_lib.count_params(model_config):,} parameters "
      f"({model_config.num_layers} layers, d_model {model_config.d_model}, "
      f"{model_config.attention} attention, vocab {model_config.vocab_size})")
  spec = make_state_spec(model_config, tx, mesh, inputs.seq_len)
  train_step = make_train_step(spec, schedule, label_smoothing=label_smoothing,
                               grad_accum_steps=accum)
  write_config(workdir, config_text)
  loop = LoopConfig(num_steps, log_every, eval_every, sample_every, checkpoint_every,
                    eval_max_batches, seed, tuple(sample_prompts),
                    min(sample_max_length or inputs.seq_len, model_config.max_len))
  checkpointer = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=keep_checkpoints,
      save_every=checkpoint_every, async_save=async_checkpoints)
  trainer = Trainer(workdir, loop, inputs, model_config, spec, train_step, checkpointer,
                    config_text)
  try:
    trainer.restore_or_init()
    with StopRequest() as stop:
      stopped = trainer.run_steps(stop)
    result = TrainResult(step=trainer.step, losses=dict(trainer.losses),
                         stopped_by_signal=stopped)
    if stopped:
      return result
    trainer.save(force=True)
    result.final_eval = trainer.evaluate(None)
    evaluate.write_json(evaluate.eval_json_path(workdir, "test", trainer.step),
                        result.final_eval)
    result.unigram_perplexity = unigram_test_perplexity(
        inputs.eval_split("train"), inputs.eval_split("test"), model_config.vocab_size)
    say(f"final test per-token perplexity {result.final_eval['per_token_perplexity']:.2f} "
        f"(per-word {result.final_eval['per_word_perplexity']:.2f}) vs unigram perplexity "
        f"{result.unigram_perplexity:.2f} of the corpus")
    return result
  finally:
    trainer.close()
    checkpointer.close()
