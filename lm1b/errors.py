"""Errors the command lines turn into a one-line message and an exit code (see lm1b.cli)."""


class ConfigError(ValueError):
  """A flag, gin binding or configuration value that cannot work; raised before anything is
  written, reported in one line, exit code 2."""
