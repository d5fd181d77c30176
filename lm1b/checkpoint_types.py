"""What lm1b.checkpoints raises and returns: the one-line checkpoint errors, the restored
result, damaged steps, and the comparison of saved and wanted shapes."""

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from etils import epath

from lm1b import checksum

_MAX_LISTED = 4


class CheckpointError(Exception):
  """Base of the checkpoint errors; the message is one line."""


class CorruptCheckpointError(CheckpointError):
  """A step that cannot be read back as it was written (unreadable file, checksum mismatch)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"checkpoint {path} is damaged: {reason}")
    self.path, self.reason = path, reason


class CheckpointMismatchError(CheckpointError):
  """The checkpoint holds arrays of other shapes/dtypes (or paths) than the model expects."""


class CheckpointWriteError(CheckpointError):
  """A save failed (in the background for asynchronous saves)."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
  """The requested step (or any step) does not exist."""


class Damaged(NamedTuple):
  """A step skipped by `restore_latest_valid`."""
  step: int
  reason: str


def describe_damaged(directory: str, damaged: Sequence[Damaged]) -> str:
  """One line naming the damaged steps of `directory` and why, e.g. 'checkpoint
  /w/checkpoints/40 is damaged (params metadata: ...)'."""
  return "; ".join(f"checkpoint {epath.Path(directory) / str(d.step)} is damaged ({d.reason})"
                   for d in damaged)


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns.

  items: {name: PyTree of jax.Arrays} for the requested items only; damaged: newer steps
  skipped by restore_latest_valid (newest first), empty otherwise.
  """
  items: dict
  data_state: dict
  config_text: str
  step: int
  damaged: list
  tokenizer_digest: str | None = None  # None for checkpoints saved without one


class ShapeDtype(NamedTuple):
  shape: tuple
  dtype: np.dtype


def summarize_error(error: BaseException, limit: int = 300) -> str:
  """One readable line for an Orbax/TensorStore/OS error: its innermost cause.

  Orbax wraps TensorStore failures in 'Encountered error while reading array index ...
  See full TensorStore details: <bound method ...>'; the cause carries the real message.
  Longer than `limit`: the middle is elided.
  """
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 32:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  innermost = chain[-1]
  if isinstance(innermost, OSError) and innermost.strerror:
    text = innermost.strerror + (f": {innermost.filename}" if innermost.filename else "")
  else:
    text = f"{type(innermost).__name__}: {innermost}"
  text = " ".join(text.split())
  if len(text) <= limit:
    return text
  half = (limit - 5) // 2  # TensorStore puts the OS error at the end: keep both ends
  return f"{text[:half]} ... {text[-half:]}"


def shapes(tree: Any) -> dict[str, ShapeDtype]:
  """{tree path: (shape, dtype)} of the leaves of an abstract or metadata tree."""
  return {checksum.path_name(path): ShapeDtype(tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _describe(spec: ShapeDtype) -> str:
  return f"{spec.shape} {spec.dtype}"


def shape_problems(item: str, saved: dict[str, ShapeDtype],
                    wanted: dict[str, ShapeDtype]) -> list[str]:
  problems = []
  for path, spec in wanted.items():
    if path not in saved:
      problems.append(f"{item}/{path}: not in the checkpoint")
    elif saved[path] != spec:
      problems.append(f"{item}/{path}: saved {_describe(saved[path])}, now {_describe(spec)}")
  problems += [f"{item}/{path}: in the checkpoint but not in the model"
               for path in saved if path not in wanted]
  return problems


def listing(problems: Sequence[str]) -> str:
  shown = "; ".join(problems[:_MAX_LISTED])
  more = len(problems) - _MAX_LISTED
  return shown + (f"; and {more} more" if more > 0 else "")
