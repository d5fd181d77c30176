"""Where the project keeps generated data (embedded corpus, token caches)."""

import os
import pathlib

DATA_ROOT_ENV = "HLM1B_DATA_ROOT"


def data_root() -> pathlib.Path:
  """Returns $HLM1B_DATA_ROOT, or ~/.cache/hlm1b when unset; the directory is created."""
  value = os.environ.get(DATA_ROOT_ENV)
  root = pathlib.Path(value) if value else pathlib.Path.home() / ".cache" / "hlm1b"
  root = root.expanduser()
  root.mkdir(parents=True, exist_ok=True)
  return root
