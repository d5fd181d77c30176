"""Native output (the runtime's C++ logging, Gloo's per-rank lines) diverted to a file.

XLA's distributed runtime and Gloo write straight to file descriptors 1 and 2: 16 `[Gloo] Rank
... is connected to ... peer ranks` lines per multi-process start, and warnings and dumps when a
peer goes away. `divert(path)` points descriptors 1 and 2 at `path` and gives Python's
`sys.stdout` / `sys.stderr` duplicates of the original descriptors, so the run's own lines (and
its logging, if configured afterwards) still reach the terminal while the runtime's go to the
file. Nothing is diverted with --verbose.
"""

import os
import sys
import tempfile


def default_path() -> str:
  """A per-process file in the temporary directory (local, even for a gs:// workdir)."""
  return os.path.join(tempfile.gettempdir(), f"lm1b-native-{os.getpid()}.log")


def divert(path: str) -> None:
  """Native writes to fds 1 and 2 go to `path` (appended); Python's streams keep the originals.

  Call before logging handlers are made: a handler keeps the stream it was given.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  for fd in (1, 2):
    os.dup2(target, fd)
  os.close(target)
  sys.stdout = open(saved[0], "w", buffering=1, encoding="utf-8", closefd=True)
  sys.stderr = open(saved[1], "w", buffering=1, encoding="utf-8", closefd=True)
