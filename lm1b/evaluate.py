"""Evaluation: per-token and per-word perplexity over a whole split.

`Evaluator.run` feeds eval batches (every target of the split exactly once, in any batch mode,
see lm1b.batches.eval_batches) through the jitted eval step, which returns sums, and adds them
up on the host in float64:

  tokens               = scored targets (sentence tokens + one EOS each)
  words                = whitespace words + 1 per sentence
  loss                 = total NLL / tokens           (nats per token)
  per_token_perplexity = exp(loss)
  per_word_perplexity  = exp(total NLL / words)

`evaluate_workdir` (python eval.py) needs only the run's configuration, the workdir's tokenizer and
parameters, and the split to score: it restores the parameters alone (never the optimizer
state) and never reads the training data.
"""

import math
from typing import Any, Callable, Iterable

import jax
import numpy as np

from lm1b import batches as batches_lib
from lm1b import experiment
from lm1b import input_pipeline
from lm1b import metrics as metrics_lib
from lm1b import partitioning
from lm1b import steps
from lm1b import workdir as workdir_lib
from lm1b.chief import is_chief
from lm1b.console import say
from lm1b.model_config import ModelConfig
from lm1b.run_config import RunConfig
from lm1b.workdir import Workdir
from lm1b.token_cache import TokenizedSplit
from lm1b.tokenizer import EOS_ID


class Evaluator:
  """Scores eval batches with a model; one compilation per (model, mesh, batch shape)."""

  def __init__(self, model_config: ModelConfig, mesh: jax.sharding.Mesh,
               param_shardings: Any):
    self.batch_sharding = partitioning.batch_sharding(mesh)
    self._step = steps.make_eval_step(model_config, mesh, param_shardings)

  def run(self, params: Any, local_batches: Iterable[dict], *, max_batches: int | None = None,
          step: int | None = None, should_stop: Callable[[], bool] | None = None
          ) -> dict | None:
    """Scores process-local eval batches (at most max_batches); returns the summary dict.

    should_stop, when given, is asked before every batch; if it says stop, the evaluation is
    abandoned and None is returned.
    """
    sums = []
    for index, local in enumerate(local_batches):
      if max_batches is not None and index >= max_batches:
        break
      if should_stop is not None and should_stop():
        return None
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


def describe_result(result: dict) -> str:
  """One line of an evaluation result, e.g. for the console."""
  return (f"loss {result['loss']:.4f} | per-token ppl {result['per_token_perplexity']:.2f} | "
          f"per-word ppl {result['per_word_perplexity']:.2f}")


def evaluate_workdir(config: RunConfig, workdir: Workdir, *, step: int | None = None,
                     split: str = "test", output: str | None = None,
                     accept_mismatch: bool = False) -> dict:
  """Scores the whole `split` with a workdir's checkpoint; prints and writes the JSON.

  config: the workdir's configuration (config.gin, lm1b.cli reads it). The JSON goes to
  `output`, by default workdir/eval_<split>_<step>.json. accept_mismatch: see
  experiment.load_trained.
  """
  inputs = config.inputs
  source = config.source(splits=(split,))
  loaded = experiment.load_trained(workdir, config.model, config.mesh(), step=step,
                                   accept_mismatch=accept_mismatch)
  data = input_pipeline.prepare_data(workdir.tokenizer, source, (split,),
                                     tokenizer=loaded.tokenizer)
  index, count = partitioning.batch_shard(loaded.mesh)
  inputs.check_processes(count)
  evaluator = Evaluator(loaded.model_config, loaded.mesh, loaded.param_shardings)
  batches = input_pipeline.eval_batches(
      data.splits[split], inputs, slot=experiment.packing_slot_for(loaded.model_config),
      process_index=index, process_count=count)
  result = evaluator.run(loaded.params, batches, step=loaded.step)
  result.update(split=split, mode=inputs.mode, test_set=data.descriptions[split])
  path = output or str(workdir.eval_json(split, loaded.step))
  if is_chief() and (note := workdir_lib.write_result(path, result)):
    say(note)
  say(f"{split} split at step {loaded.step} ({result['test_set']}): {result['sentences']} "
      f"sentences, {result['tokens']} tokens, {describe_result(result)} -> {path}")
  return result


def unigram_test_perplexity(train_split: TokenizedSplit, test_split: TokenizedSplit,
                            vocab_size: int) -> float:
  """Perplexity on the test targets of a unigram model counted on the train split.

  Targets are every sentence's token ids plus its EOS; counts are add-one smoothed.
  """
  counts = np.bincount(np.asarray(train_split.tokens), minlength=vocab_size)
  counts = counts[:vocab_size].astype(np.float64) + 1.0
  counts[EOS_ID] += len(train_split)
  log_probs = np.log(counts / counts.sum())
  test_tokens = np.asarray(test_split.tokens)
  total = log_probs[test_tokens].sum() + len(test_split) * log_probs[EOS_ID]
  return metrics_lib.perplexity(-total / (len(test_tokens) + len(test_split)))
