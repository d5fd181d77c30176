"""Wires source -> tokenizer -> token cache -> batches for training and evaluation."""

import dataclasses
import os
from typing import Callable

import gin
import jax

from lm1b import sources, token_cache, tokenizer as tokenizer_lib
from lm1b.batches import TrainBatches, check_sharding


@dataclasses.dataclass
class Inputs:
  """Everything train/eval need from the data side.

  tokenizer: the workdir's SentencePiece model. train: this process's TrainBatches (resumable
  via .state()/.restore()). eval_split(split) -> TokenizedSplit (cached, loaded on first use).
  """
  tokenizer: tokenizer_lib.Tokenizer
  train: TrainBatches
  seq_len: int
  eval_global_batch: int
  source_name: str
  _load_split: Callable[[str], token_cache.TokenizedSplit] = dataclasses.field(repr=False)
  _eval_splits: dict = dataclasses.field(default_factory=dict, repr=False)

  def eval_split(self, split: str = "test") -> token_cache.TokenizedSplit:
    """The tokenized `split` of the source (built into the token cache on first use)."""
    if split not in self._eval_splits:
      self._eval_splits[split] = self._load_split(split)
    return self._eval_splits[split]


@gin.configurable
def build_inputs(workdir: str | os.PathLike, *, global_batch: int = 64, seq_len: int = 128,
                 mode: str = "sentence", seed: int = 0, eval_global_batch: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Inputs:
  """Builds the gin-configured source, the workdir tokenizer, the train cache and batches.

  process_index/process_count default to jax.process_index()/jax.process_count(); global_batch
  and eval_global_batch (default global_batch) must be multiples of process_count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  eval_global_batch = global_batch if eval_global_batch is None else eval_global_batch
  check_sharding(global_batch, process_index, process_count)
  try:
    check_sharding(eval_global_batch, process_index, process_count)
  except ValueError as e:
    raise ValueError(f"eval_global_batch: {e}") from None
  source = sources.make_source()
  tokenizer = tokenizer_lib.load_or_train_tokenizer(workdir, source)

  def load_split(split: str) -> token_cache.TokenizedSplit:
    return token_cache.load_or_build_tokenized(source, split, tokenizer)

  train = TrainBatches(load_split("train"), global_batch=global_batch, seq_len=seq_len,
                       mode=mode, seed=seed, process_index=process_index,
                       process_count=process_count)
  return Inputs(tokenizer=tokenizer, train=train, seq_len=seq_len,
                eval_global_batch=eval_global_batch, source_name=source.name,
                _load_split=load_split)
