"""Evaluation: per-token and per-word perplexity over a whole split, and workdir loading.

`Evaluator.run` feeds eval batches (every sentence of the split exactly once, see
lm1b.batches.eval_batches) through a jitted step that returns sums, and accumulates them on
the host in float64:

  tokens              = scored targets (sentence tokens + one EOS each)
  words               = whitespace words + 1 per sentence
  loss                = total NLL / tokens           (nats per token)
  per_token_perplexity = exp(loss)
  per_word_perplexity  = exp(total NLL / words)

`evaluate_workdir` (python eval.py) restores a checkpoint of a training workdir, scores a
split and writes workdir/eval_<split>_<step>.json (or another path). `load_workdir` is shared
with sample.py.
"""

import dataclasses
import json
import logging
import math
import os
import tempfile
from typing import Any, Iterable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from lm1b import batches as batches_lib
from lm1b import metrics as metrics_lib
from lm1b import model as model_lib
from lm1b import optim
from lm1b import partitioning

_LOG = logging.getLogger(__name__)


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same directory and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, data: dict) -> str:
  """Writes `data` to `path` as indented JSON, atomically (process 0 only); returns path."""
  if jax.process_index() == 0:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
  return path


def eval_json_path(workdir: str, split: str, step: int) -> str:
  """The default result file of an evaluation: workdir/eval_<split>_<step>.json."""
  return os.path.join(workdir, f"eval_{split}_{step}.json")


class Evaluator:
  """Scores eval batches with a model; one compilation per (model, mesh, batch shape)."""

  def __init__(self, model_config: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
               param_shardings: Any):
    self.mesh = mesh
    self.batch_sharding = partitioning.batch_sharding(mesh)
    model = model_lib.DecoderLM(model_config)

    def eval_step(params, batch):
      """Sums over one global batch: nll, tokens (weights), words, sentences (f32 [])."""
      logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], deterministic=True)
      _, tokens, nll = optim.cross_entropy_loss(logits, batch["targets"], batch["weights"])
      return {"nll": nll, "tokens": tokens, "words": jnp.sum(batch["words"]),
              "sentences": jnp.sum((batch["words"] > 0).astype(jnp.float32))}

    self._step = jax.jit(eval_step, in_shardings=(param_shardings, self.batch_sharding),
                         out_shardings=partitioning.replicated(mesh))

  def run(self, params: Any, local_batches: Iterable[dict], *, max_batches: int | None = None,
          step: int | None = None) -> dict:
    """Scores process-local eval batches (at most max_batches); returns the summary dict."""
    from lm1b.train import sharding_context  # pylint: disable=import-outside-toplevel
    sums = []
    with sharding_context(self.mesh):
      for index, local in enumerate(local_batches):
        if max_batches is not None and index >= max_batches:
          break
        batch = batches_lib.to_global_arrays(local, self.batch_sharding)
        sums.append(self._step(params, batch))
    return summarize(jax.device_get(sums), step)


def summarize(sums: list[dict], step: int | None) -> dict:
  """Adds up per-batch sums in float64 and derives losses and perplexities."""
  total = {key: float(np.sum([np.float64(s[key]) for s in sums])) if sums else 0.0
           for key in ("nll", "tokens", "words", "sentences")}
  loss = total["nll"] / total["tokens"] if total["tokens"] else math.nan
  per_word = total["nll"] / total["words"] if total["words"] else math.nan
  return {
      "step": step, "sentences": int(round(total["sentences"])),
      "tokens": int(round(total["tokens"])), "words": int(round(total["words"])),
      "loss": loss, "per_token_perplexity": metrics_lib.perplexity(loss),
      "per_word_perplexity": metrics_lib.perplexity(per_word),
  }


def evaluate_split(model_config: model_lib.ModelConfig, params: Any,
                   local_batches: Iterable[dict], *, mesh: jax.sharding.Mesh,
                   param_shardings: Any, max_batches: int | None = None,
                   step: int | None = None) -> dict:
  """One-off evaluation (compiles a fresh Evaluator); see Evaluator.run."""
  evaluator = Evaluator(model_config, mesh, param_shardings)
  return evaluator.run(params, local_batches, max_batches=max_batches, step=step)


@dataclasses.dataclass
class Loaded:
  """A trained model restored from a workdir."""
  model_config: model_lib.ModelConfig
  params: Any
  step: int
  inputs: Any   # lm1b.input_pipeline.Inputs (tokenizer, eval splits, ...)
  spec: Any     # lm1b.train.StateSpec


def load_workdir(workdir: str, step: int | None = None) -> Loaded:
  """Restores `step` (default: the latest readable checkpoint) of a training workdir.

  gin must already hold the workdir's config.gin (lm1b.cli does that). A corrupt latest
  checkpoint is reported (naming its directory) and the previous one is used.
  """
  from lm1b import checkpoints, train  # pylint: disable=import-outside-toplevel
  tokenizer_path = os.path.join(workdir, "tokenizer.model")
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"{tokenizer_path} not found: is {workdir} a training workdir?")
  mesh = partitioning.make_mesh()
  inputs = train.build_process_inputs(workdir, mesh)
  model_config = train.build_model_config(inputs.tokenizer.vocab_size, inputs.seq_len)
  # The optimizer only fixes the structure of the saved state; the schedule does not matter.
  num_steps = gin.get_bindings(train.train_and_evaluate).get("num_steps", 1 << 30)
  tx, _, _ = train.build_optimizer(num_steps)
  spec = train.make_state_spec(model_config, tx, mesh, inputs.seq_len)
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          async_save=False)
  abstract = {"params": spec.abstract.params}  # the optimizer state is not read
  try:
    if step is None:
      restored = checkpointer.restore_latest_valid(abstract)
      if restored is None:
        raise checkpoints.NoCheckpointError(f"no checkpoint in {checkpointer.directory}")
    else:
      restored = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  return Loaded(model_config, restored.items["params"], restored.step, inputs, spec)


def evaluate_workdir(workdir: str, *, step: int | None = None, split: str = "test",
                     output: str | None = None) -> dict:
  """Scores the whole `split` with a workdir's checkpoint; prints and writes the JSON.

  The JSON goes to `output`, by default workdir/eval_<split>_<step>.json (see eval_json_path).
  """
  from lm1b import train  # pylint: disable=import-outside-toplevel
  say = train.say
  loaded = load_workdir(workdir, step)
  inputs = loaded.inputs
  mesh = loaded.spec.mesh
  result = evaluate_split(
      loaded.model_config, loaded.params, train.eval_batches(inputs, split, mesh), mesh=mesh,
      param_shardings=loaded.spec.shardings.params, step=loaded.step)
  result["split"] = split
  path = write_json(output or eval_json_path(workdir, split, loaded.step), result)
  say(json.dumps(result, sort_keys=True))
  say(f"{split} split at step {loaded.step}: {result['sentences']} sentences, "
      f"{result['tokens']} tokens, per-token perplexity {result['per_token_perplexity']:.3f}, "
      f"per-word perplexity {result['per_word_perplexity']:.3f} -> {path}")
  return result
