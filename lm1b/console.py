"""User-facing console lines: printed once (by the chief process), logged everywhere."""

import logging

from lm1b.chief import is_chief

_LOG = logging.getLogger(__name__)


def say(message: str) -> None:
  """Prints `message` (flushed) on the chief process and logs it at DEBUG on every process."""
  if is_chief():
    print(message, flush=True)
  _LOG.debug(message)
