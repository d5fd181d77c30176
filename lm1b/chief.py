"""The one "is this the chief process" switch."""

import jax


def is_chief() -> bool:
  """Process 0 of a multi-process run, or the only process; never starts a backend.

  The chief alone prints, writes the workdir's files (config.gin, tokenizer, results, event
  files), holds the workdir lock and moves damaged checkpoints aside.
  """
  return not jax.distributed.is_initialized() or jax.process_index() == 0
