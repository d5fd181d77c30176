"""Errors the command lines turn into a one-line message and an exit code (see lm1b.cli)."""


class ConfigError(ValueError):
  """A flag, gin binding or configuration value that cannot work; raised before anything is
  written, reported in one line, exit code 2.

  owner: the configuration class or function whose argument the message names, when the
  message starts with that argument ("seq_len=0 must be ..."); the command line then names
  it by its gin binding (lm1b.run_config.describe_error), so "seq_len=0 ..." reads
  "<binding>.seq_len=0 ...".
  """

  def __init__(self, message: str, *, owner: object = None):
    super().__init__(message)
    self.owner = owner
