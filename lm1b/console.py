"""User-facing console lines: printed once (by process 0), logged everywhere."""

import logging

import jax

_LOG = logging.getLogger(__name__)


def is_chief() -> bool:
  """Process 0 of a multi-process run, or the only process; never starts a backend."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def say(message: str) -> None:
  """Prints `message` (flushed) on the chief process and logs it at DEBUG on every process."""
  if is_chief():
    print(message, flush=True)
  _LOG.debug(message)
