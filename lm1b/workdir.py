"""The run directory: `Workdir` names every file of a run, and result files are written here.

A workdir holds

  config.gin                 the run's gin configuration (compared on every resume; eval.py
                             and sample.py rebuild the model from it)
  tokenizer.model            the SentencePiece model the run trained (or reused)
  checkpoints/<step>/        Orbax checkpoints (lm1b.checkpoints)
  checkpoints/corrupt/       damaged steps moved aside by training
  tensorboard/               event files (lm1b.metrics)
  train.lock                 held by the running trainer (lm1b.workdir_lock)
  eval_<split>_<step>.json   evaluation results

Paths go through etils.epath (the path library Orbax uses), so a workdir may be a local
directory or a gs:// location (see lm1b.storage).
"""

import json
import os

from etils import epath

from lm1b import storage
from lm1b.errors import ConfigError


class Workdir:
  """The files of one run directory (local or gs://); nothing is created by naming them."""

  def __init__(self, root: epath.PathLike):
    self.root = epath.Path(os.fspath(root))
    self.config = self.root / "config.gin"
    self.tokenizer = self.root / "tokenizer.model"
    self.checkpoints = self.root / "checkpoints"
    self.quarantine = self.checkpoints / "corrupt"  # damaged steps, moved aside by training
    self.tensorboard = self.root / "tensorboard"
    self.lock = self.root / "train.lock"

  def __str__(self) -> str:
    return str(self.root)

  def eval_json(self, split: str, step: int) -> epath.Path:
    """The default result file of an evaluation."""
    return self.root / f"eval_{split}_{step}.json"

  def read_config(self) -> str | None:
    """The text of config.gin, or None when there is none.

    Raises ConfigError naming the file when it is not UTF-8 or truncated (gin.config_str()
    always ends with a newline).
    """
    path = self.config
    if not path.exists():
      return None
    try:
      text = path.read_text()
    except UnicodeDecodeError as error:
      raise ConfigError(f"{path} is unreadable (not UTF-8: {error.reason} at byte "
                        f"{error.start}); restore it or use a new --workdir") from None
    if text and not text.endswith("\n"):
      raise ConfigError(f"{path} is truncated (it ends inside the line "
                        f"{text.splitlines()[-1]!r}); restore it or use a new --workdir")
    return text

  def write_config(self, config_text: str) -> None:
    storage.write_text_atomic(self.config, config_text)


def write_json(path: epath.PathLike, data: dict) -> str:
  """Writes `data` to `path` as indented JSON, atomically; returns the path."""
  storage.write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
  return str(path)


def write_result(path: epath.PathLike, result: dict) -> str | None:
  """Writes an evaluation result as JSON (write_json). A file already there that holds a
  different result (another loss or token count) is kept as <name>.replaced-<n>.json;
  returns a one-line note saying so, None otherwise."""
  path = epath.Path(path)
  note = None
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError:
      old = {}
    if any(old.get(key) != result.get(key) for key in ("step", "loss", "tokens")):
      kept = _free_name(path)
      storage.move_file(path, kept)
      note = (f"{path} held a different result (step {old.get('step')}, loss "
              f"{old.get('loss')}); kept as {kept}")
  write_json(path, result)
  return note


def _free_name(path: epath.Path) -> epath.Path:
  index = 1
  while (candidate := path.with_name(f"{path.stem}.replaced-{index}{path.suffix}")).exists():
    index += 1
  return candidate
