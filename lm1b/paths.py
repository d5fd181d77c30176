"""Where the project keeps generated data (embedded corpus, token caches).

The data root is a local directory: token caches are memory-mapped. On a pod, each host has
its own (or one prepared once and copied to every host); only workdirs may be on gs://.
"""

import os
import pathlib

from lm1b.errors import ConfigError

DATA_ROOT_ENV = "HLM1B_DATA_ROOT"


def data_root() -> pathlib.Path:
  """Returns $HLM1B_DATA_ROOT, or ~/.cache/hlm1b when unset; the directory is created.

  Raises ConfigError for a URL (gs://...): the data root must be on a local disk.
  """
  value = os.environ.get(DATA_ROOT_ENV)
  if value and "://" in value:
    raise ConfigError(f"{DATA_ROOT_ENV}={value} must be a local directory (token caches are "
                      "memory-mapped); put the workdir on Cloud Storage instead")
  root = pathlib.Path(value) if value else pathlib.Path.home() / ".cache" / "hlm1b"
  root = root.expanduser()
  root.mkdir(parents=True, exist_ok=True)
  return root
