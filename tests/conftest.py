"""Shared pytest setup: run JAX on the CPU, never on an accelerator found by chance."""

import os

import gin
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _clear_gin_config():
  """No test sees gin bindings parsed by another (gin's configuration is process-global)."""
  yield
  gin.clear_config()
