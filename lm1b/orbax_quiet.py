"""Keeps Orbax's own diagnostics off the console (lm1b.checkpoints says what failed in one line).

`install()` (once per process, idempotent) adds a filter that drops log records emitted from
Orbax's sources unless the `lm1b.checkpoints` logger is at DEBUG (`--verbose`), and an
unraisable-exception hook that drops the harmless leftovers of an abandoned Orbax read.
"""

import functools
import logging
import os
import sys
from typing import Any

import orbax.checkpoint as ocp

_CHECKPOINT_LOG = logging.getLogger("lm1b.checkpoints")
_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))


class _OrbaxRecordFilter(logging.Filter):
  """Drops log records emitted from Orbax's sources unless lm1b.checkpoints is at DEBUG.

  Our own one-line errors say what failed; Orbax logs each failure again with tracebacks.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return (not record.pathname.startswith(_ORBAX_DIR)
            or _CHECKPOINT_LOG.isEnabledFor(logging.DEBUG))


def _is_abandoned_orbax_read(unraisable: Any) -> bool:
  """After a failed restore Orbax closes its event loop while TensorStore reads are still
  pending: their completion callbacks fail with 'Event loop is closed', and their
  coroutines, closed later by the garbage collector, raise from Orbax's error wrapper.
  Both are harmless and reach only sys.unraisablehook."""
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and code.co_filename.startswith(_ORBAX_DIR)


@functools.cache
def install() -> None:
  """Installs the record filter and the unraisable-exception filter (once per process)."""
  logging.getLogger("absl").addFilter(_OrbaxRecordFilter())
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_orbax_read(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = hook
