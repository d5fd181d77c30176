"""Data preparation and batches: source -> tokenizer -> token caches -> batches.

`prepare_data` makes every split a run needs ready before its first step: the workdir's
tokenizer (trained by process 0, the others wait for its file) and the token caches (built by
one process per data root under a build lock, the others wait for the cache's marker file).
`train.py --prepare_only` runs it without touching an accelerator.
"""

import dataclasses
import logging
import time
from typing import Callable, Iterator

from etils import epath

from lm1b import batches as batches_lib
from lm1b import sources, token_cache
from lm1b import tokenizer as tokenizer_lib
from lm1b.errors import ConfigError

_LOG = logging.getLogger(__name__)
WAIT_LOG_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What the batches look like (gin: `build_inputs`, see lm1b.run_config).

  global_batch: rows per training batch (all processes together); seq_len: positions per row;
  mode: how rows are filled, in training and evaluation (lm1b.batches.MODES); seed: the data
  order; eval_global_batch: rows per evaluation batch (default global_batch); eval_overlap:
  in stream mode, context positions shared by consecutive evaluation windows (0: disjoint
  windows; more: every target scored once with at least that much left context).
  """
  global_batch: int = 64
  seq_len: int = 128
  mode: str = "sentence"
  seed: int = 0
  eval_global_batch: int | None = None
  eval_overlap: int = 0

  def __post_init__(self):
    for name in ("global_batch", "seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int", owner=InputConfig)
    if self.eval_global_batch is not None and (
        not isinstance(self.eval_global_batch, int) or self.eval_global_batch < 1):
      raise ConfigError(f"eval_global_batch={self.eval_global_batch!r} must be a positive "
                        "int", owner=InputConfig)
    if self.mode not in batches_lib.MODES:
      raise ConfigError(f"mode={self.mode!r} must be one of {batches_lib.MODES}",
                        owner=InputConfig)
    if not isinstance(self.eval_overlap, int) or not 0 <= self.eval_overlap < self.seq_len:
      raise ConfigError(f"eval_overlap={self.eval_overlap!r} must be an int in "
                        f"[0, seq_len={self.seq_len})", owner=InputConfig)

  @property
  def eval_batch(self) -> int:
    return self.eval_global_batch or self.global_batch

  def check_processes(self, process_count: int) -> None:
    """ConfigError unless both batch sizes divide among `process_count` processes."""
    for name, value in (("global_batch", self.global_batch),
                        ("eval_global_batch", self.eval_batch)):
      if value % process_count:
        raise ConfigError(f"{name}={value} must be a multiple of the {process_count} "
                          "processes feeding it", owner=InputConfig)


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The tokenizer and the tokenized splits of a run, with a description of each split
  (which data, how many sentences) for result files."""
  tokenizer: tokenizer_lib.Tokenizer
  splits: dict[str, token_cache.TokenizedSplit]
  descriptions: dict[str, str]


def wait_for_file(path: epath.Path, what: str, poll_s: float = 1.0) -> None:
  """Blocks until `path` exists, logging what it waits for every WAIT_LOG_EVERY_S seconds."""
  start = last = time.monotonic()
  while not path.exists():
    if time.monotonic() - last >= WAIT_LOG_EVERY_S:
      last = time.monotonic()
      _LOG.info("waiting for %s (%s) for %.0f s", what, path, last - start)
    time.sleep(poll_s)


TrainTokenizer = Callable[[epath.Path, sources.SentenceSource], tokenizer_lib.Tokenizer]


def prepare_tokenizer(path: epath.Path, source: sources.SentenceSource, *, is_chief: bool,
                      train_tokenizer: TrainTokenizer = tokenizer_lib.load_or_train_tokenizer
                      ) -> tokenizer_lib.Tokenizer:
  """The tokenizer model at `path`: trained by the chief process if absent
  (`train_tokenizer(path, source)`), waited for by the others."""
  if is_chief:
    return train_tokenizer(path, source)
  wait_for_file(path, "the tokenizer, trained by process 0")
  return tokenizer_lib.load_tokenizer(path)


def prepare_data(tokenizer_path: epath.PathLike, source: sources.SentenceSource,
                 splits: tuple[str, ...], *, is_chief: bool = True,
                 tokenizer: tokenizer_lib.Tokenizer | None = None,
                 train_tokenizer: TrainTokenizer = tokenizer_lib.load_or_train_tokenizer
                 ) -> PreparedData:
  """Tokenizer and token caches of `splits`, all ready when this returns (see module doc).

  tokenizer_path: the run's tokenizer model (lm1b.workdir.Workdir.tokenizer), trained with
  `train_tokenizer` (the run's configured lm1b.tokenizer.load_or_train_tokenizer) if absent.
  tokenizer: an already loaded tokenizer (evaluation) instead; then a damaged token cache is
  reported (CorruptTokenCacheError), while training (no tokenizer given) moves it aside and
  rebuilds it.
  """
  rebuild_damaged = tokenizer is None
  if tokenizer is None:
    tokenizer = prepare_tokenizer(epath.Path(tokenizer_path), source, is_chief=is_chief,
                                  train_tokenizer=train_tokenizer)
  tokenized = {split: token_cache.load_or_build_tokenized(source, split, tokenizer,
                                                          rebuild_damaged=rebuild_damaged)
               for split in splits}
  descriptions = {split: f"{source.describe(split)} ({len(tokenized[split])} sentences)"
                  for split in splits}
  return PreparedData(tokenizer, tokenized, descriptions)


def train_batches(split: token_cache.TokenizedSplit, config: InputConfig, *,
                  slot: batches_lib.Slot, process_index: int,
                  process_count: int) -> batches_lib.TrainBatches:
  """This process's rows of the run's training batches (resumable, see TrainBatches).

  slot: where a piece may sit in a packed row (lm1b.experiment.packing_slot_for the model).
  """
  return batches_lib.TrainBatches(
      split, global_batch=config.global_batch, seq_len=config.seq_len, mode=config.mode,
      seed=config.seed, process_index=process_index, process_count=process_count, slot=slot)


def eval_batches(split: token_cache.TokenizedSplit, config: InputConfig, *,
                 slot: batches_lib.Slot, process_index: int,
                 process_count: int) -> Iterator[dict]:
  """This process's rows of the batches that score every target of `split` once."""
  return batches_lib.eval_batches(
      split, global_batch=config.eval_batch, seq_len=config.seq_len, mode=config.mode,
      slot=slot, overlap=config.eval_overlap, process_index=process_index,
      process_count=process_count)
