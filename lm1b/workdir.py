"""The files of a run directory that are not checkpoints: config.gin and results.

A workdir holds config.gin (the run's gin configuration, compared on every resume),
tokenizer.model, checkpoints/, tensorboard/ and eval_<split>_<step>.json files. Paths go
through etils.epath (the path library Orbax uses), so a workdir may be a local directory or a
gs:// location (see lm1b.storage).
"""

import json

from etils import epath

from lm1b import storage
from lm1b.errors import ConfigError
from lm1b.tokenizer import MODEL_FILENAME

CONFIG_FILE = "config.gin"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
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


def read_config(workdir: epath.PathLike) -> str | None:
  """The text of workdir/config.gin, or None when there is none.

  Raises ConfigError naming the file when it is not UTF-8 or truncated (gin.config_str()
  always ends with a newline).
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    text = path.read_text()
  except UnicodeDecodeError as error:
    raise ConfigError(f"{path} is unreadable (not UTF-8: {error.reason} at byte "
                      f"{error.start}); restore it or use a new --workdir") from None
  if text and not text.endswith("\n"):
    raise ConfigError(f"{path} is truncated (it ends inside the line {text.splitlines()[-1]!r});"
                      " restore it or use a new --workdir")
  return text


def config_differences(old_text: str, new_text: str) -> list[str]:
  """The selectors whose bindings differ between two config texts, except those that may
  change on resume (RESUMABLE_SELECTORS), sorted."""
  old, new = config_bindings(old_text), config_bindings(new_text)
  return sorted(key for key in set(old) | set(new)
                if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_SELECTORS))


def check_config(workdir: epath.PathLike, config_text: str) -> None:
  """ConfigError if workdir/config.gin is from a run with other model or data settings.

  Only bindings of train_and_evaluate (loop lengths, logging) and make_mesh may differ.
  """
  old_text = read_config(workdir)
  if old_text is None:
    return
  changed = config_differences(old_text, config_text)
  if changed:
    raise ConfigError(f"{epath.Path(workdir) / CONFIG_FILE} is from a run with a different "
                      f"configuration (differs in {', '.join(changed)}); use a new --workdir "
                      "or the same settings")


def differences_from_checkpoint(workdir: epath.PathLike, checkpoint: str,
                                saved_config: str, saved_tokenizer: str | None,
                                tokenizer_digest: str) -> list[str]:
  """What of the workdir's config.gin and tokenizer differs from the checkpoint's
  checksummed copies (one phrase each; empty when they agree).

  saved_config: the checkpoint's config text; saved_tokenizer: its sha256 of the tokenizer
  model (None for checkpoints that predate it: not compared); tokenizer_digest: the sha256 of
  the workdir's tokenizer model. Bindings that may change on resume are not compared.
  """
  problems = []
  changed = config_differences(saved_config, read_config(workdir) or "")
  if changed:
    problems.append(f"{epath.Path(workdir) / CONFIG_FILE} differs from the copy in checkpoint "
                    f"{checkpoint} (in {', '.join(changed)})")
  if saved_tokenizer is not None and saved_tokenizer != tokenizer_digest:
    problems.append(f"{epath.Path(workdir) / MODEL_FILENAME} differs from the one checkpoint "
                    f"{checkpoint} was trained with (sha256 {tokenizer_digest[:12]}..., "
                    f"recorded {saved_tokenizer[:12]}...)")
  return problems


def write_config(workdir: epath.PathLike, config_text: str) -> None:
  storage.write_text_atomic(epath.Path(workdir) / CONFIG_FILE, config_text)


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


def eval_json_path(workdir: epath.PathLike, split: str, step: int) -> str:
  """The default result file of an evaluation: workdir/eval_<split>_<step>.json."""
  return str(epath.Path(workdir) / f"eval_{split}_{step}.json")
