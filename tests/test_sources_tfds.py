"""Tests for lm1b.sources.TfdsSource.

Runs in both environments and never skips:
- main venv (no TensorFlow): TfdsSource / make_source(kind="tfds") fail with the one-line
  install hint;
- TFDS venv (`pip install -r requirements-tfds.txt`): the source reads lm1b through
  tfds.testing.mock_data, offline, with the split metadata kept in tests/data/tfds_metadata
  (MockPolicy.USE_FILES, so the real split names "train"/"test" are enforced).
In both, importing lm1b.sources must not import TensorFlow.
"""

import importlib.util
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from lm1b import sources

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
METADATA_DIR = pathlib.Path(__file__).parent / "data" / "tfds_metadata"
REPO = pathlib.Path(__file__).parent.parent


def test_importing_sources_does_not_import_tensorflow():
  code = ("import sys, lm1b.sources, lm1b.corpus; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True, env=env)
  assert result.stdout.strip() == "[]"


def _assert_install_hint(error: ImportError, *, via_gin: bool = False):
  message = str(error)
  if via_gin:  # gin appends "\n  In call to configurable 'make_source' (...)" to every error
    message, note = message.split("\n", 1)
    assert "make_source" in note and "\n" not in note
  assert sources.TFDS_INSTALL_HINT in message and "\n" not in message


def test_missing_tfds_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
  with pytest.raises(ImportError) as error:
    sources.TfdsSource()
  _assert_install_hint(error.value)
  with pytest.raises(ImportError) as error:
    sources.make_source("tfds", tfds_data_dir="/nonexistent")
  _assert_install_hint(error.value, via_gin=True)


_EXAMPLES = [b"first sentence .", b"  padded  ", b"", b"bad \xff byte .", b"two\nlines",
             b" ".join([b"word"] * 2000)]


def _as_dataset(builder, split, *args, **kwargs):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  del builder, args, kwargs
  texts = [b"test only ."] if split == "test" else _EXAMPLES
  return tf.data.Dataset.from_tensor_slices({"text": texts})


def _check_mocked_source(caplog):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  policy = tfds.testing.MockPolicy.USE_FILES
  with tfds.testing.mock_data(policy=policy, data_dir=str(METADATA_DIR),
                              as_dataset_fn=_as_dataset):
    source = sources.make_source("tfds", tfds_name="lm1b")
    assert isinstance(source, sources.TfdsSource) and source.name == "tfds:lm1b"
    with caplog.at_level(logging.INFO):
      train = list(source.sentences("train"))
    assert train[:5] == ["first sentence .", "padded", "bad \ufffd byte .", "two", "lines"]
    assert len(train) == 8 and " ".join(train[5:]).split() == ["word"] * 2000
    assert all(len(s) <= sources.MAX_LINE_CHARS for s in train)
    log = caplog.records[-1].getMessage()
    assert "tfds:lm1b[train]: 7 lines -> 8 sentences; 1 empty skipped" in log
    assert "1 with invalid UTF-8 replaced, 1 longer than 4096 chars split" in log
    assert list(source.sentences("test")) == ["test only ."]
    assert source.fingerprint("test") == sources.TfdsSource().fingerprint("test")
    assert source.fingerprint("test") != source.fingerprint("train")
  with tfds.testing.mock_data(num_examples=4, policy=policy, data_dir=str(METADATA_DIR)):
    random_text = list(sources.TfdsSource("lm1b").sentences("test"))
  assert 1 <= len(random_text) <= 4 and all(isinstance(s, str) for s in random_text)


def test_tfds_source(caplog):
  """The mocked lm1b when TFDS is installed, else the clean install error (no skip)."""
  if HAVE_TFDS:
    _check_mocked_source(caplog)
  else:
    with pytest.raises(ImportError) as error:
      sources.TfdsSource("lm1b")
    _assert_install_hint(error.value)
    assert "tensorflow" not in sys.modules
