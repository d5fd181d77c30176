"""Shared pytest setup: run JAX on the CPU, never on an accelerator found by chance; skip the
tests marked `tfds` where the optional TensorFlow Datasets extra is not installed."""

import importlib.util
import os

import gin
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  if HAVE_TFDS:
    return
  skip = pytest.mark.skip(reason="needs TensorFlow Datasets: pip install -r requirements-tfds.txt")
  for item in items:
    if "tfds" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clear_gin_config():
  """No test sees gin bindings parsed by another (gin's configuration is process-global)."""
  yield
  gin.clear_config()
