"""What a run is made of, built the same way for training, evaluation and sampling.

  ModelConfig + the tokenizer's vocabulary      ->  with_vocab
  model config + optimizer + mesh               ->  StateSpec: shapes and shardings of the
                                                    TrainState (nothing allocated)
  StateSpec + seed                              ->  init_state, created directly sharded
  model config + mesh                           ->  abstract_params: what eval.py and sample.py
                                                    restore (the parameters alone)

Model code is always traced inside `partitioning.mesh_context`, so the logical sharding
constraints of the model hold for init as for every step.
"""

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

import hattention
from lm1b import batches as batches_lib
from lm1b import checkpoints
from lm1b import model as model_lib
from lm1b import optim
from lm1b import partitioning
from lm1b import run_config
from lm1b import tokenizer as tokenizer_lib
from lm1b.chief import is_chief
from lm1b.errors import ConfigError
from lm1b.model_config import ModelConfig
from lm1b.workdir import Workdir

_LOG = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data-iterator state.

  params: float32 parameter tree; opt_state: optax state; step: int32 [] (train steps done);
  rng: uint32 [2] raw PRNG key (dropout keys are fold_in(rng, step)).
  """
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def checkpoint_items(state: TrainState) -> dict[str, Any]:
  """The state as separately restorable checkpoint items (params alone for eval/sampling)."""
  return {"params": state.params, "opt_state": state.opt_state,
          "train": {"step": state.step, "rng": state.rng}}


def state_from_items(items: dict[str, Any]) -> TrainState:
  """Inverse of checkpoint_items."""
  return TrainState(params=items["params"], opt_state=items["opt_state"],
                    step=items["train"]["step"], rng=items["train"]["rng"])


def with_vocab(config: ModelConfig, vocab_size: int) -> ModelConfig:
  """`config` with the tokenizer's vocabulary size (the configured one is a default)."""
  if config.vocab_size != vocab_size:
    _LOG.info("ModelConfig.vocab_size %d replaced by the tokenizer's %d", config.vocab_size,
              vocab_size)
    config = dataclasses.replace(config, vocab_size=vocab_size)
  return config


def packing_slot_for(config: ModelConfig) -> batches_lib.Slot:
  """Where a piece may sit in a packed row so that it gets exactly the attention, hence the
  logits, it would get alone in a row: hierarchical attention needs aligned offsets and
  reserved spans (hattention.packing_slot), full attention none."""
  if config.attention == "full":
    return batches_lib.contiguous_slot
  return functools.partial(hattention.packing_slot, block_size=config.block_size)


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """How to build, shard and restore a TrainState for one model/optimizer/mesh."""
  model: model_lib.DecoderLM
  optimizer: optim.Optimizer
  mesh: jax.sharding.Mesh
  shardings: TrainState   # of NamedSharding
  abstract: TrainState    # of jax.ShapeDtypeStruct carrying .sharding


def _init_boxed(model: model_lib.DecoderLM, tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  """A fresh TrainState whose parameters (and their optimizer slots) keep logical names."""
  params_rng, state_rng = jax.random.split(rng)
  params = model.init({"params": params_rng}, jnp.zeros((1, 1), jnp.int32))["params"]
  return TrainState(params=params, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), rng=state_rng)


def _abstract(boxed: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of the unboxed `boxed` tree, each carrying its sharding."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      nn.unbox(boxed), shardings)


def make_state_spec(model_config: ModelConfig, optimizer: optim.Optimizer,
                    mesh: jax.sharding.Mesh) -> StateSpec:
  """Shapes and shardings of the TrainState, from jax.eval_shape (nothing allocated)."""
  model = model_lib.DecoderLM(model_config)
  with partitioning.mesh_context(mesh):
    boxed = jax.eval_shape(lambda: _init_boxed(model, optimizer.tx, jax.random.PRNGKey(0)))
  shardings = partitioning.state_shardings(mesh, boxed)
  return StateSpec(model, optimizer, mesh, shardings, _abstract(boxed, shardings))


def init_state(spec: StateSpec, seed: int) -> TrainState:
  """A fresh TrainState created directly with its shardings (jitted init)."""
  init = jax.jit(lambda rng: nn.unbox(_init_boxed(spec.model, spec.optimizer.tx, rng)),
                 out_shardings=spec.shardings)
  with partitioning.mesh_context(spec.mesh):
    return init(jax.random.PRNGKey(seed))


def abstract_params(model_config: ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """ShapeDtypeStructs (with shardings) of the model's parameters: what to restore."""
  model = model_lib.DecoderLM(model_config)
  with partitioning.mesh_context(mesh):
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
  return _abstract(boxed, partitioning.state_shardings(mesh, boxed))


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A trained model restored from a workdir: what eval.py and sample.py need."""
  model_config: ModelConfig
  params: Any
  param_shardings: Any
  step: int
  tokenizer: tokenizer_lib.Tokenizer
  mesh: jax.sharding.Mesh


def load_trained(workdir: Workdir, model_config: ModelConfig, mesh: jax.sharding.Mesh, *,
                 step: int | None = None, accept_mismatch: bool = False) -> TrainedModel:
  """The workdir's tokenizer and the parameters of checkpoint `step` (default: the latest
  readable one) on `mesh`; the optimizer state is never read, and nothing in the workdir is
  written (safe beside a running trainer).

  The workdir's config.gin and tokenizer are compared with the checkpoint's checksummed
  copies: a difference raises ConfigError (one line), or with accept_mismatch is logged.
  Raises FileNotFoundError when the workdir has no tokenizer or no such checkpoint.
  """
  tokenizer = tokenizer_lib.load_tokenizer(workdir.tokenizer)
  model_config = with_vocab(model_config, tokenizer.vocab_size)
  abstract = {"params": abstract_params(model_config, mesh)}
  with checkpoints.Checkpointer(workdir.checkpoints, read_only=True) as checkpointer:
    if step is None:
      restored = checkpointer.restore_latest_valid(abstract)
      if restored is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
      if restored.damaged and is_chief():  # stderr: sample.py's stdout is the samples
        _LOG.warning("%s; using step %d (left in place; train.py moves damaged steps aside)",
                     checkpoints.describe_damaged(checkpointer.directory, restored.damaged),
                     restored.step)
    else:
      restored = checkpointer.restore(abstract, step)
  _check_copies(workdir, checkpointer.step_path(restored.step), restored, tokenizer,
                accept_mismatch)
  shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract["params"])
  return TrainedModel(model_config, restored.items["params"], shardings, restored.step,
                      tokenizer, mesh)


def _check_copies(workdir: Workdir, checkpoint: str, restored: checkpoints.Restored,
                  tokenizer: tokenizer_lib.Tokenizer, accept: bool) -> None:
  """ConfigError unless config.gin and the tokenizer match the checkpoint's copies (a warning
  instead when `accept`)."""
  problems = run_config.differences_from_checkpoint(
      workdir, checkpoint, restored.config_text, restored.tokenizer_digest, tokenizer.digest())
  if not problems:
    return
  if not accept:
    raise ConfigError("; ".join(problems) + "; pass --accept_mismatch to use them anyway")
  if is_chief():
    _LOG.warning("%s; used anyway (--accept_mismatch)", "; ".join(problems))
