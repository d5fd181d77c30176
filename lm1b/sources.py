"""Sentence sources: where the raw text comes from (embedded corpus, LM1B tarball, text, TFDS).

Every source yields clean sentences (str) for the splits "train" and "test". File-based sources
share `lm1b.text_lines.clean_lines`: bytes are decoded as UTF-8 with errors="replace" (lines with a replacement
character are counted), lines are stripped, empty lines skipped, and lines longer than
MAX_LINE_CHARS characters split at whitespace (hard-split when a piece has none) into several
sentences; each file's counts are logged (DEBUG, or WARNING when anything was cleaned).
Reading is streamed, so huge files or a 1 MB line are fine. TensorFlow is imported only inside
TfdsSource's methods.
"""

import abc
import glob
import hashlib
import http.client
import json
import os
import pathlib
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence


from lm1b import corpus
from lm1b.text_lines import CLEANING_VERSION, LineStats, clean_lines, read_file_sentences
from lm1b.errors import ConfigError

SPLITS = ("train", "test")
TFDS_INSTALL_HINT = "pip install -r requirements-tfds.txt"
DOWNLOAD_CHECK_TIMEOUT_S = 10.0  # how long TfdsSource waits for a download's server to answer
LM1B_TARBALL_DIR = "1-billion-word-language-modeling-benchmark-r13output"  # the tarball's top dir


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


class SentenceSource(abc.ABC):
  """A corpus with a train and a test split of sentences."""

  name: str

  @abc.abstractmethod
  def sentences(self, split: str) -> Iterator[str]:
    """Yields the cleaned sentences of `split` ("train" or "test") in a fixed order."""

  @abc.abstractmethod
  def fingerprint(self, split: str) -> str:
    """A stable hex digest that changes when the split's data changes (for cache keys)."""

  def describe(self, split: str) -> str:
    """Which data `split` is, in words (for result files)."""
    return f"{self.name} {split}"


class _FileSource(SentenceSource):
  """A source whose splits are lists of files, checked when the source is built."""

  def __init__(self, files: dict[str, list[pathlib.Path]], origin: dict[str, str]):
    for split in files:
      if all(path.stat().st_size == 0 for path in files[split]):
        names = ", ".join(map(str, files[split]))
        raise ValueError(f"{self.name}: every {split} file is empty: {names}")
    self._files = files
    self._origin = origin

  def files(self, split: str) -> list[pathlib.Path]:
    _check_split(split)
    if split not in self._files:
      raise ValueError(f"{self.name}: the {split} split was not opened (splits "
                       f"{sorted(self._files)})")
    return list(self._files[split])

  def describe(self, split: str) -> str:
    names = ", ".join(path.name for path in self.files(split))
    return f"{self.name} {split}: {names}"

  def sentences(self, split: str) -> Iterator[str]:
    count = 0
    for path in self.files(split):
      for sentence in read_file_sentences(path):
        count += 1
        yield sentence
    if count == 0:
      raise ValueError(f"{self.name}: {split} split {self._origin[split]} has no sentences "
                       "(only empty or whitespace lines)")

  def fingerprint(self, split: str) -> str:
    digest = hashlib.sha256(f"{type(self).__name__}|{split}|{CLEANING_VERSION}".encode())
    for path in self.files(split):
      stat = path.stat()
      digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class TarballSource(_FileSource):
  """The official LM1B tarball layout under `path` (the extracted 1-billion-word directory).

  train = every training-monolingual.tokenized.shuffled/news.en-*-of-* shard, sorted;
  test = the heldout shards numbered in `test_shards` (default 00000, the literature's test set).
  Only the directories of `splits` must exist.
  """

  def __init__(self, path: str | os.PathLike, test_shards: Sequence[int] = (0,),
               splits: Sequence[str] = SPLITS):
    self.path = pathlib.Path(path)
    self.name = f"tarball:{self.path}"
    if not self.path.is_dir():
      raise FileNotFoundError(f"LM1B tarball directory not found: {self.path}")
    files, origin = {}, {}
    if "train" in splits:
      train_dir = self._directory(corpus.TRAIN_DIR)
      origin["train"] = str(train_dir / "news.en-?????-of-?????")
      files["train"] = sorted(pathlib.Path(p) for p in glob.glob(origin["train"]))
      if not files["train"]:
        raise FileNotFoundError(f"no LM1B training shards match {origin['train']}")
    if "test" in splits:
      if not test_shards:
        raise ValueError(f"{self.name}: test_shards is empty")
      heldout_dir = self._directory(corpus.HELDOUT_DIR)
      files["test"] = [self._heldout_shard(heldout_dir, int(i)) for i in test_shards]
      origin["test"] = ", ".join(map(str, files["test"]))
    super().__init__(files, origin)

  def _directory(self, name: str) -> pathlib.Path:
    directory = self.path / name
    if not directory.is_dir():
      raise FileNotFoundError(f"LM1B tarball directory not found: {directory}")
    return directory

  @staticmethod
  def _heldout_shard(heldout_dir: pathlib.Path, index: int) -> pathlib.Path:
    pattern = str(heldout_dir / f"news.en.heldout-{index:05d}-of-?????")
    found = glob.glob(pattern)
    if len(found) != 1:
      raise FileNotFoundError(f"LM1B heldout shard {index} not found: {pattern}")
    return pathlib.Path(found[0])


class EmbeddedSource(TarballSource):
  """The project's synthetic grammar corpus (see lm1b.corpus), generated on first use; with
  documents=True its document variant (runs of related sentences, in file order)."""

  def __init__(self, root: str | os.PathLike | None = None, test_shards: Sequence[int] = (0,),
               *, scale: float = 1.0, documents: bool = False,
               splits: Sequence[str] = SPLITS):
    path = corpus.ensure_embedded_corpus(
        pathlib.Path(root) if root is not None else None, scale=scale, documents=documents)
    super().__init__(path, test_shards, splits)
    self.name = path.name


class TextSource(_FileSource):
  """Plain UTF-8 text files, one sentence per line, selected by a glob per split (sorted)."""

  def __init__(self, train_glob: str | None, test_glob: str | None,
               splits: Sequence[str] = SPLITS):
    self.name = f"text:{train_glob}"
    files, origin = {}, {}
    for split, pattern in (("train", train_glob), ("test", test_glob)):
      if split not in splits:
        continue
      if pattern is None:
        raise ValueError(f"source kind='text' needs {split}_glob")
      found = glob.glob(os.path.expanduser(pattern), recursive=True)
      matches = sorted(pathlib.Path(p) for p in found)
      files[split] = [p for p in matches if p.is_file()]
      origin[split] = pattern
      if not files[split]:
        raise FileNotFoundError(f"{split} glob matches no files: {pattern}")
    super().__init__(files, origin)


class DataUnavailableError(RuntimeError):
  """A source's data cannot be had on this machine: a download is unreachable, or prepared
  data is incomplete. The message is one line that says what to do (the command lines print
  it and exit 1)."""


class MissingDependencyError(DataUnavailableError, ConfigError):
  """An optional package the configured source needs is not installed; the message names the
  install command (the command lines exit 2, as for any configuration problem)."""


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise MissingDependencyError(f"the tfds source needs TensorFlow Datasets ({error}); run: "
                                 f"{TFDS_INSTALL_HINT}") from error
  return tfds


def _url_reachable_error(url: str) -> str | None:
  """None if the server of `url` answers a HEAD request within DOWNLOAD_CHECK_TIMEOUT_S, else why.

  Any HTTP status counts as an answer; proxies from the environment are used, as TFDS does.
  """
  request = urllib.request.Request(url, method="HEAD")
  try:
    urllib.request.urlopen(request, timeout=DOWNLOAD_CHECK_TIMEOUT_S).close()
  except urllib.error.HTTPError:
    return None
  except urllib.error.URLError as error:
    return str(error.reason)
  except (OSError, http.client.HTTPException) as error:
    return str(error) or type(error).__name__
  return None


def _download_is_local(builder, url: str, expected) -> bool:
  """Whether TFDS takes `url` from disk: its manual dir or its download cache under data_dir.

  `expected` is the url's registered UrlInfo (size, checksum, filename). The places are those
  TFDS's DownloadManager looks in before it downloads (downloads/manual/<filename>, then
  downloads/<dataset>/<url-and-checksum name> and its older location without <dataset>/).
  """
  resource = _import_tfds().core.download.resource
  downloads = builder.data_dir_root / "downloads"
  if expected.filename and (downloads / "manual" / expected.filename).exists():
    return True
  cached_name = resource.get_dl_fname(url, expected.checksum)
  return any(resource.is_locally_cached(directory / cached_name)
             for directory in (downloads / builder.name, downloads))


def _check_downloads_reachable(builder) -> None:
  """Raises DataUnavailableError (one line) if a download the builder needs is neither on disk
  nor reachable, so that a machine without network fails in seconds instead of retrying for
  minutes. Builders that register no download checksums are not checked."""
  for url, expected in (builder.url_infos or {}).items():
    if _download_is_local(builder, url, expected):
      continue
    reason = _url_reachable_error(url)
    if reason is not None:
      raise DataUnavailableError(
          f"tfds:{builder.name}: cannot reach {url} ({reason}) to download "
          f"{builder.info.full_name} into {builder.data_dir_root}; either read the unpacked LM1B "
          f'tarball (make_source(kind="tarball", path="/path/to/{LM1B_TARBALL_DIR}")) or set '
          f"make_source(tfds_data_dir=...) to a directory where {builder.info.full_name} is "
          "already prepared")


def _prepared_builder(name: str, data_dir: str | None):
  """The TFDS builder of `name`, its data prepared under data_dir (downloaded if need be).

  data_dir None means TFDS's default ($TFDS_DATA_DIR, else ~/tensorflow_datasets). Prepared
  data is used as it is, without any network access.
  """
  tfds = _import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    # (is_prepared() alone logs a warning when the directory does not exist yet)
    if not (builder.data_path.exists() and builder.is_prepared()):
      _check_downloads_reachable(builder)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except ImportError as error:  # TFDS imports parts of itself and its dependencies lazily
    raise MissingDependencyError(f"TensorFlow Datasets cannot load {name!r} ({error}); run: "
                                 f"{TFDS_INSTALL_HINT}") from error
  return builder


def _prepared_split_identity(builder, split: str) -> dict:
  """What identifies a prepared split: TFDS's split info (examples and bytes per shard, from
  dataset_info.json) and each shard file's name and size; raises DataUnavailableError if the
  split or one of its shard files is missing."""
  location = f"tfds:{builder.name} in {builder.data_path}"
  if split not in builder.info.splits:
    raise DataUnavailableError(f"{location} has no {split} split (splits: "
                               f"{sorted(builder.info.splits)})")
  info = builder.info.splits[split]
  shards = []
  for filename, examples in zip(info.filenames, info.shard_lengths, strict=True):
    path = builder.data_path / filename
    if not path.exists():
      raise DataUnavailableError(f"{location} is incomplete: {path} is missing; copy the whole "
                                 f"{builder.info.full_name} directory again or delete it and "
                                 "prepare it anew")
    shards.append([filename, int(examples), path.stat().length])  # epath: any TFDS filesystem
  return {"dataset": builder.info.full_name, "split": split, "num_bytes": int(info.num_bytes),
          "shards": shards}


class TfdsSource(SentenceSource):
  """A TFDS text dataset (default lm1b), the "text" feature of each example.

  Built once: the dataset is downloaded and prepared under `data_dir` if it is not there yet
  (TFDS's lm1b: train = the 99 training shards, test = all 50 heldout shards), failing within
  seconds with a one-line DataUnavailableError when the download cannot be reached. The
  fingerprint identifies the prepared data, not its location: TFDS's shard lengths and bytes
  and the shard files' sizes, so a copy elsewhere shares its token cache and other data never
  does.
  """

  def __init__(self, name: str = "lm1b", data_dir: str | None = None):
    self.tfds_name = name
    self.data_dir = data_dir
    self.name = f"tfds:{name}"
    self._builder = _prepared_builder(name, data_dir)
    self._identity = {split: _prepared_split_identity(self._builder, split) for split in SPLITS}

  def sentences(self, split: str) -> Iterator[str]:
    _check_split(split)
    tfds = _import_tfds()
    dataset = self._builder.as_dataset(split=split, shuffle_files=False)
    stats = LineStats()
    chunks = (line + "\n"
              for example in tfds.as_numpy(dataset)
              for line in example["text"].decode("utf-8", errors="replace").split("\n"))
    yield from clean_lines(chunks, stats)
    stats.log(f"{self.name}[{split}]")
    if stats.sentences == 0:
      raise ValueError(f"{self.name}: {split} split has no sentences")

  def fingerprint(self, split: str) -> str:
    _check_split(split)
    key = {"source": "TfdsSource", "cleaning": CLEANING_VERSION, **self._identity[split]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def make_source(kind: str = "embedded", path: str | None = None, train_glob: str | None = None,
                test_glob: str | None = None, test_shards: Sequence[int] = (0,),
                tfds_name: str = "lm1b", tfds_data_dir: str | None = None,
                splits: Sequence[str] = SPLITS) -> SentenceSource:
  """Builds the source named by `kind`: "embedded", "embedded_documents", "tarball", "text" or
  "tfds".

  embedded: the synthetic corpus under `path` (a data root; default data_root()).
  embedded_documents: the same grammar written as documents (lm1b.corpus), under `path`.
  tarball: the extracted LM1B directory `path`, test = heldout shards `test_shards`.
  text: files matching `train_glob` / `test_glob`.
  tfds: TFDS's `tfds_name` prepared under `tfds_data_dir` (default $TFDS_DATA_DIR, else
    ~/tensorflow_datasets), downloaded and prepared there first if need be.
  splits: the splits the caller will read (file sources check only their files).
  """
  if kind in ("embedded", "embedded_documents"):
    return EmbeddedSource(path, test_shards, documents=kind == "embedded_documents",
                          splits=splits)
  if kind == "tarball":
    if path is None:
      raise ValueError("source kind='tarball' needs path (the extracted LM1B directory)")
    return TarballSource(path, test_shards, splits)
  if kind == "text":
    return TextSource(train_glob, test_glob, splits)
  if kind == "tfds":
    return TfdsSource(tfds_name, tfds_data_dir)
  raise ValueError(f"unknown source kind {kind!r}; expected embedded, embedded_documents, "
                   "tarball, text or tfds")
