"""Run files on a local disk or on Cloud Storage (gs://), through etils.epath.

etils.epath is the path library Orbax uses; for gs:// it goes through fsspec and gcsfs (the
optional `gcs` extra: pip install -r requirements-gcs.txt), and Orbax writes the checkpoint
arrays through TensorStore's own GCS driver. What differs on an object store, and how the
project deals with it:

* no directories: creating one is a no-op and a "directory" exists while an object lies under
  it, so a run that wrote nothing leaves nothing behind;
* no rename: an object is replaced atomically by writing it whole (it appears only once its
  upload is complete), so `write_bytes_atomic` writes gs:// objects directly and local files
  through a temporary file and a rename; `move_tree` copies then deletes on gs://;
* listings change under gcsfs's feet (TensorStore and other hosts write too), so gcsfs keeps
  no listings cache (`use_listings_cache=False` as the fsspec default for gcs).

Token caches are memory-mapped, so they stay on a local disk (lm1b.paths.data_root).
"""

import importlib
import os
import uuid
from typing import Iterator

import fsspec
from etils import epath

from lm1b.errors import ConfigError

GCS_SCHEME = "gs://"
GCS_INSTALL_HINT = "pip install -r requirements-gcs.txt"

fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(path: epath.PathLike) -> bool:
  """True for a URL such as gs://bucket/run, False for a local path."""
  return "://" in os.fspath(path)


def resolve(path: epath.PathLike) -> str:
  """An absolute local path, or the URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def check_location(path: epath.PathLike, what: str) -> None:
  """ConfigError unless `path` is local or a gs:// URL whose bucket can be reached.

  what: how the user named it (e.g. '--workdir'), for the message.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return
  if not path.startswith(GCS_SCHEME):
    raise ConfigError(f"{what} {path}: only local paths and {GCS_SCHEME} URLs are supported")
  bucket = path[len(GCS_SCHEME):].split("/", 1)[0]
  if not bucket:
    raise ConfigError(f"{what} {path} names no bucket (gs://BUCKET/path)")
  try:
    importlib.import_module("gcsfs")  # what fsspec loads for gs://
  except ImportError as error:
    raise ConfigError(f"{what} {path} needs gcsfs for Cloud Storage ({error}); run: "
                      f"{GCS_INSTALL_HINT}") from error
  try:  # listing needs only storage.objects.list (reading the bucket's metadata needs more)
    next(iter(epath.Path(GCS_SCHEME + bucket).iterdir()), None)
  except FileNotFoundError:
    raise ConfigError(f"{what} {path}: bucket {bucket!r} does not exist") from None
  except OSError as error:
    raise ConfigError(f"{what} {path}: bucket {bucket!r} cannot be listed ({error})") from error


def write_bytes_atomic(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old or the new contents, never a part.

  Local: a temporary file in the same directory, flushed to disk, then renamed over `path`.
  gs://: the object is written directly (an upload becomes visible only when complete).
  """
  path = epath.Path(path)
  if is_remote(path):
    path.write_bytes(data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".tmp-{uuid.uuid4().hex}"  # not `path.name`: TensorBoard would
  # read a name containing "tfevents"
  try:
    with open(temporary, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    temporary.replace(path)
  finally:
    if temporary.exists():
      temporary.unlink()


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def move_tree(source: epath.PathLike, target: epath.PathLike) -> None:
  """Moves the directory `source` to `target` (which must not exist).

  Local: one atomic rename. gs://: every object is copied, then the source is deleted; an
  interruption loses nothing (during the copy the source is whole, during the deletion the
  copy is).
  """
  source, target = epath.Path(source), epath.Path(target)
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
    return
  for item in _files(source):
    item.copy(target / item.relative_to(source))
  source.rmtree()


def move_file(source: epath.PathLike, target: epath.PathLike) -> None:
  """Moves one file (a rename locally; a copy then a delete on gs://)."""
  source, target = epath.Path(source), epath.Path(target)
  if is_remote(source):
    source.copy(target)
    source.unlink()
  else:
    source.rename(target)


def _files(directory: epath.Path) -> Iterator[epath.Path]:
  """Every file below `directory`, recursively."""
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child
