"""Tests for lm1b.sources.TfdsSource, the TFDS route to real LM1B.

Unmarked tests run in every environment: importing lm1b.sources never imports TensorFlow, a
missing TensorFlow Datasets is one line naming the install command, and the extra's pins agree.

Tests marked `tfds` need the extra (`python -m pytest -q -m tfds` in a virtualenv with
requirements-tfds.txt; skipped elsewhere). They go through TFDS's own lm1b builder, offline: a
tiny archive in the official tarball layout (the 1% embedded corpus plus an empty and an
over-long line) is put where TFDS keeps a finished download of the 1.8 GB tarball (TFDS checked
its checksum when it stored it, so it trusts it), and `download_and_prepare` extracts and
prepares it as it would the real one. Network access is refused throughout: in this process by
patched sockets that record every attempt, in subprocesses by proxies that point at a closed
local port.
"""

import collections
import contextlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import tomllib
from unittest import mock

import pytest

from lm1b import corpus, sources

REPO = pathlib.Path(__file__).resolve().parent.parent
METADATA_DIR = pathlib.Path(__file__).parent / "data" / "tfds_metadata"
LM1B_URL = ("http://www.statmt.org/lm-benchmark/"
            "1-billion-word-language-modeling-benchmark-r13output.tar.gz")
EXTRA_TRAIN_LINES = ("", " ".join(["word"] * 2000))  # skipped, and split into two sentences
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
NO_TFDS = "import sys; sys.modules['tensorflow_datasets'] = None; "


def _env(data_root: pathlib.Path, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", HLM1B_DATA_ROOT=str(data_root),
             PYTHONPATH=str(REPO), **extra)
  for name in ("XLA_FLAGS", "no_proxy", "NO_PROXY"):
    env.pop(name, None)
  return env


def _last_error_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr
  return stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ without TensorFlow as well


def test_importing_sources_does_not_import_tensorflow():
  code = ("import sys, lm1b.sources, lm1b.corpus; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True, env=_env(REPO))
  assert result.stdout.strip() == "[]"


def test_missing_tfds_gives_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
  with pytest.raises(sources.MissingDependencyError) as error:
    sources.TfdsSource()
  assert sources.TFDS_INSTALL_HINT in str(error.value) and "\n" not in str(error.value)


def test_train_without_tfds_prints_the_install_command_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  code = NO_TFDS + "from lm1b import cli; sys.exit(cli.train_main(sys.argv[1:]))"
  result = subprocess.run(
      [sys.executable, "-c", code, "--gin_file", "gin/lm1b_53m.gin", "--workdir", str(workdir)],
      cwd=REPO, env=_env(tmp_path / "data"), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  line = _last_error_line(result.stderr)
  assert line.startswith("error: the tfds source needs TensorFlow Datasets"), line
  assert line.endswith(f"run: {sources.TFDS_INSTALL_HINT}"), line
  assert not workdir.exists()


def test_tfds_pins_agree_in_requirements_pyproject_and_dockerfile():
  lines = (REPO / "requirements-tfds.txt").read_text().splitlines()
  pins = sorted(line for line in lines if line and not line.startswith("#"))
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  assert pins == sorted(pyproject["project"]["optional-dependencies"]["tfds"])
  assert all("==" in pin for pin in pins) and "importlib-resources==7.1.0" in pins
  assert "pip install -r requirements-tfds.txt" in (REPO / "Dockerfile").read_text()


# ------------------------------------------------------------------ with the TFDS extra

Tarball = collections.namedtuple("Tarball", "unpacked archive")
Prepared = collections.namedtuple("Prepared", "data_dir source network_attempts")


@contextlib.contextmanager
def refused_network():
  """Every socket look-up or connection in this process fails; yields the list of attempts."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access refused by the test")

  with mock.patch("socket.getaddrinfo", refuse), mock.patch.object(socket.socket, "connect",
                                                                   refuse):
    yield attempts


@pytest.fixture(name="closed_port")
def _closed_port():
  """A local TCP port that refuses connections (bound, never listening)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]


def _offline_env(tmp_path: pathlib.Path, closed_port: int) -> dict:
  """Subprocess environment without network (proxies at a closed port) whose default TFDS
  data directory is an empty one of its own."""
  proxy = f"http://127.0.0.1:{closed_port}"
  return _env(tmp_path / "data_root", TFDS_DATA_DIR=str(tmp_path / "tfds_default"),
              **{name: proxy for name in PROXY_VARIABLES})


@pytest.fixture(name="lm1b_tarball", scope="module")
def _lm1b_tarball(tmp_path_factory) -> Tarball:
  """A tiny LM1B, unpacked and as .tar.gz, in the official layout: 10 training and 2 heldout
  shards of the 1% embedded corpus, the first training shard with EXTRA_TRAIN_LINES."""
  root = tmp_path_factory.mktemp("lm1b")
  unpacked = root / sources.LM1B_TARBALL_DIR
  shutil.copytree(corpus.ensure_embedded_corpus(root / "data", scale=0.01), unpacked)
  with open(unpacked / corpus.TRAIN_DIR / corpus.train_shard_name(1), "a") as shard:
    shard.write("\n".join(EXTRA_TRAIN_LINES) + "\n")
  archive = root / "lm1b.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(unpacked, arcname=unpacked.name)
  return Tarball(unpacked, archive)


def seed_download_cache(data_dir: pathlib.Path, archive: pathlib.Path) -> None:
  """Puts `archive` where TFDS keeps its finished download of lm1b's tarball under data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  (url, expected), = tfds.builder("lm1b", data_dir=str(data_dir)).url_infos.items()
  assert url == LM1B_URL
  resource = tfds.core.download.resource
  path = data_dir / "downloads" / "lm1b" / resource.get_dl_fname(url, expected.checksum)
  path.parent.mkdir(parents=True)
  shutil.copy(archive, path)
  resource.write_info_file(url=url, path=path, dataset_name="lm1b",
                           original_fname=expected.filename, url_info=expected)


@pytest.fixture(name="prepared", scope="module")
def _prepared(lm1b_tarball, tmp_path_factory) -> Prepared:
  """TfdsSource("lm1b") built on a data_dir whose download cache holds the tiny archive."""
  data_dir = tmp_path_factory.mktemp("tfds")
  seed_download_cache(data_dir, lm1b_tarball.archive)
  with refused_network() as attempts:
    source = sources.TfdsSource("lm1b", str(data_dir))
  return Prepared(data_dir, source, attempts)


def _line_count(paths) -> int:
  return sum(len(path.read_text().splitlines()) for path in paths)


@pytest.mark.tfds
def test_installed_tfds_packages_are_the_pinned_ones():
  lines = (REPO / "requirements-tfds.txt").read_text().splitlines()
  for pin in (line for line in lines if line and not line.startswith("#")):
    name, version = pin.split("==")
    assert importlib.metadata.version(name) == version, pin


@pytest.mark.tfds
def test_pinned_tfds_never_reaches_gcs():
  """The no-network guarantees rest on this: with GCS on, TFDS reads gs://tfds-data/dataset_info
  even for tfds.builder(try_gcs=False), through TensorFlow's own filesystem (and its retries),
  which the socket patches here cannot see. Recheck both when the TFDS pin moves."""
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=import-outside-toplevel
  assert gcs_utils._is_gcs_disabled  # pylint: disable=protected-access


@pytest.mark.tfds
def test_lm1b_is_downloaded_and_prepared_from_the_archive_offline(prepared, lm1b_tarball):
  assert prepared.network_attempts == []
  info = json.loads((prepared.data_dir / "lm1b" / "1.1.0" / "dataset_info.json").read_text())
  examples = {split["name"]: sum(map(int, split["shardLengths"])) for split in info["splits"]}
  train_files = sorted((lm1b_tarball.unpacked / corpus.TRAIN_DIR).iterdir())
  heldout_files = sorted((lm1b_tarball.unpacked / corpus.HELDOUT_DIR).iterdir())
  assert examples == {"train": _line_count(train_files), "test": _line_count(heldout_files)}
  # TFDS's test split is every heldout shard; the tarball source's default is shard 00000.
  all_heldout = sources.TarballSource(lm1b_tarball.unpacked, test_shards=(0, 1))
  test = list(prepared.source.sentences("test"))
  assert sorted(test) == sorted(all_heldout.sentences("test"))
  assert len(test) > len(list(sources.TarballSource(lm1b_tarball.unpacked).sentences("test")))
  train = list(prepared.source.sentences("train"))
  assert sorted(train) == sorted(all_heldout.sentences("train"))
  pieces = [sentence for sentence in train if set(sentence.split()) == {"word"}]
  assert len(pieces) > 1 and " ".join(pieces).split() == ["word"] * 2000  # the long line, split


@pytest.mark.tfds
def test_prepared_data_is_read_without_network(prepared):
  with refused_network() as attempts:
    source = sources.make_source("tfds", tfds_data_dir=str(prepared.data_dir))
    first = next(source.sentences("test"))
    fingerprint = source.fingerprint("train")
  assert attempts == []
  assert first == next(prepared.source.sentences("test"))
  assert fingerprint == prepared.source.fingerprint("train")


@pytest.mark.tfds
def test_unreachable_download_fails_at_once_in_one_line(tmp_path):
  with refused_network() as attempts, pytest.raises(sources.DataUnavailableError) as error:
    sources.TfdsSource("lm1b", str(tmp_path))
  message = str(error.value)
  assert "\n" not in message and f"cannot reach {LM1B_URL}" in message, message
  assert 'make_source(kind="tarball", path=' in message, message
  assert "make_source(tfds_data_dir=" in message, message
  assert len(attempts) == 1  # one look-up: no retries
  assert not (tmp_path / "lm1b").exists()


@pytest.mark.tfds
def test_tarball_in_the_manual_dir_is_used_without_network_and_checked(tmp_path, lm1b_tarball):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  shutil.copy(lm1b_tarball.archive, manual / f"{sources.LM1B_TARBALL_DIR}.tar.gz")
  with refused_network() as attempts, pytest.raises(
      tfds.core.download.download_manager.NonMatchingChecksumError):
    sources.TfdsSource("lm1b", str(tmp_path))  # TFDS holds it to the real tarball's checksum
  assert attempts == []


@pytest.mark.tfds
def test_fingerprint_identifies_the_prepared_data_not_its_place(prepared, tmp_path):
  original = {split: prepared.source.fingerprint(split) for split in sources.SPLITS}
  assert original["train"] != original["test"]

  def fingerprints(data_dir):
    source = sources.TfdsSource("lm1b", str(data_dir))
    return {split: source.fingerprint(split) for split in sources.SPLITS}

  def copy(name):
    shutil.copytree(prepared.data_dir / "lm1b", tmp_path / name / "lm1b")
    return tmp_path / name, tmp_path / name / "lm1b" / "1.1.0"

  same, _ = copy("same")
  assert fingerprints(same) == original
  grown, version_dir = copy("grown")  # one train shard a byte longer
  with open(next(version_dir.glob("lm1b-train.*")), "ab") as shard:
    shard.write(b"\0")
  changed = fingerprints(grown)
  assert changed["train"] != original["train"] and changed["test"] == original["test"]
  relabelled, version_dir = copy("relabelled")  # the same files, other split info
  info_path = version_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  (test_info,) = [split for split in info["splits"] if split["name"] == "test"]
  test_info["numBytes"] = str(int(test_info["numBytes"]) + 1)
  info_path.write_text(json.dumps(info))
  changed = fingerprints(relabelled)
  assert changed["test"] != original["test"] and changed["train"] == original["train"]
  partial, version_dir = copy("partial")
  missing = next(version_dir.glob("lm1b-test.*"))
  missing.unlink()
  with pytest.raises(sources.DataUnavailableError, match=f"incomplete: {missing} is missing"):
    sources.TfdsSource("lm1b", str(partial))


@pytest.mark.tfds
def test_metadata_without_data_never_passes_for_lm1b():
  """tfds.testing.mock_data serves dataset_info.json with real LM1B's split sizes but no shard
  files: such a source is refused, so it can never get a token-cache key."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(METADATA_DIR)):
    with pytest.raises(sources.DataUnavailableError, match="is incomplete"):
      sources.TfdsSource("lm1b")


MICRO_PARAMS = [  # a model that trains in seconds (on top of gin/lm1b_53m.gin)
    "load_or_train_tokenizer.vocab_size = 256", "ModelConfig.num_layers = 1",
    "ModelConfig.num_heads = 2", "ModelConfig.d_model = 32", "ModelConfig.d_ff = 64",
    "ModelConfig.max_len = 32", "ModelConfig.block_size = 8", 'ModelConfig.dtype = "float32"',
    "build_inputs.seq_len = 32", "build_inputs.global_batch = 8",
    "build_inputs.eval_global_batch = 16", "make_schedule.warmup_steps = 1",
    "train_and_evaluate.num_steps = 2", "train_and_evaluate.log_every = 1",
    "train_and_evaluate.eval_every = 0", "train_and_evaluate.sample_every = 0",
    "train_and_evaluate.checkpoint_every = 2", "train_and_evaluate.eval_max_batches = 1",
]


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.tfds
def test_train_and_eval_command_lines_prepare_and_read_lm1b_offline(lm1b_tarball, tmp_path,
                                                                    closed_port):
  data_dir, workdir, output = tmp_path / "tfds", tmp_path / "run", tmp_path / "eval.json"
  seed_download_cache(data_dir, lm1b_tarball.archive)
  env = _offline_env(tmp_path, closed_port)
  params = MICRO_PARAMS + [f'make_source.tfds_data_dir = "{data_dir}"']
  flags = [flag for param in params for flag in ("--gin_param", param)]
  train = _run(["train.py", "--gin_file", "gin/lm1b_53m.gin", "--workdir", str(workdir), *flags],
               env)
  assert train.returncode == 0, train.stdout + train.stderr
  assert (data_dir / "lm1b" / "1.1.0" / "dataset_info.json").is_file()
  assert not pathlib.Path(env["TFDS_DATA_DIR"]).exists()
  evaluation = _run(["eval.py", "--workdir", str(workdir), "--output", str(output)], env)
  assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
  heldout = sources.TarballSource(lm1b_tarball.unpacked, test_shards=(0, 1))
  assert json.loads(output.read_text())["sentences"] == len(list(heldout.sentences("test")))


@pytest.mark.tfds
def test_incomplete_extra_is_one_line_naming_the_install_command(tmp_path, closed_port):
  """The extra without importlib-resources (TFDS needs it but does not declare it)."""
  workdir = tmp_path / "run"
  code = ("import sys; sys.modules['importlib_resources'] = None; from lm1b import cli; "
          "sys.exit(cli.train_main(sys.argv[1:]))")
  result = _run(["-c", code, "--gin_file", "gin/lm1b_53m.gin", "--workdir", str(workdir)],
                _offline_env(tmp_path, closed_port))
  assert result.returncode == 2, result.stdout + result.stderr
  line = _last_error_line(result.stderr)
  assert line.startswith("error: TensorFlow Datasets cannot load 'lm1b'"), line
  assert "importlib_resources" in line and line.endswith(sources.TFDS_INSTALL_HINT), line
  assert not workdir.exists()


@pytest.mark.tfds
def test_offline_train_fails_in_seconds_in_one_line_and_writes_nothing(tmp_path, closed_port):
  workdir = tmp_path / "run"
  result = _run(["train.py", "--gin_file", "gin/lm1b_53m.gin", "--workdir", str(workdir)],
                _offline_env(tmp_path, closed_port))
  assert result.returncode == 1, result.stdout + result.stderr
  line = _last_error_line(result.stderr)
  assert line.startswith(f"error: tfds:lm1b: cannot reach {LM1B_URL}"), line
  assert "path=" in line and "make_source(tfds_data_dir=" in line, line
  assert not workdir.exists()
