"""A lock file that keeps a second training process out of a workdir.

`WorkdirLock(workdir)` creates <workdir>/train.lock atomically (see below), holding
the holder's host, pid, process start time, the time it took the lock and a heartbeat that
a daemon thread refreshes. A second holder is refused at once with WorkdirLockedError naming
the holder. The file is removed on any exit of the `with` block (normal or exception). A lock
left by a crash or `kill -9` is recognised as stale and taken over with a warning:

* holder on this host: its pid is not running (or is a zombie), or the pid now belongs to a
  process that started at another time (pid reuse);
* holder on another host (a shared workdir): its heartbeat is older than `stale_after`.

With several processes, only process 0 should hold the lock (pass enabled=False elsewhere).

Where the lock lives decides how it is made atomic:

* a local directory (or NFSv3+): O_CREAT | O_EXCL creation; a stale lock is renamed to a name
  of its own before it is removed, so two contenders cannot both take it over;
* gs:// (lm1b.storage): Cloud Storage has neither O_EXCL nor rename. The lock object is
  created with gcsfs's create-if-absent upload (the precondition ifGenerationMatch=0), so of
  two processes creating it at once exactly one succeeds. Taking a stale lock over, the
  heartbeat and the release read the lock, check its token and then delete or rewrite it:
  between that read and the write another process could have taken the lock over, which it
  does only after `stale_after` seconds without a heartbeat (or two contenders take over the
  same stale lock within that instant). The heartbeat notices a lost lock at its next beat
  and logs it.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import NamedTuple

import fsspec
from etils import epath

from lm1b import storage

_LOG = logging.getLogger(__name__)
LOCK_FILE = "train.lock"
_TAKEOVER_ATTEMPTS = 3


class WorkdirLockedError(RuntimeError):
  """The workdir is held by a live process; the message (one line) names it."""


class LockInfo(NamedTuple):
  """The contents of a lock file. start_ticks: the holder's start time in clock ticks after
  boot (Linux /proc), None where unknown; since, heartbeat: seconds since the epoch."""
  host: str
  pid: int
  start_ticks: int | None
  since: float
  heartbeat: float
  token: str


def _proc_stat_fields(pid: int) -> list[str] | None:
  """Fields 3.. of /proc/<pid>/stat (state first), None if unavailable."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return None
  return text[text.rindex(")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
  """When `pid` started, in clock ticks after boot (Linux); None if unknown or not running."""
  fields = _proc_stat_fields(pid)
  return int(fields[19]) if fields else None


def pid_running(pid: int) -> bool:
  """True if a process with this pid exists and is not a zombie."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  fields = _proc_stat_fields(pid)
  return not (fields and fields[0] == "Z")


def _format_time(seconds: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _parse(data: bytes | None) -> LockInfo | None:
  """The LockInfo in a lock file's bytes; None for missing or invalid (e.g. half written)."""
  if data is None:
    return None
  try:
    return LockInfo(**json.loads(data))
  except (ValueError, TypeError):
    return None


def _encode(info: LockInfo) -> bytes:
  return json.dumps(info._asdict()).encode("utf-8")


class _LocalLockFile:
  """The lock file in a local directory: O_EXCL creation, atomic renames."""

  def __init__(self, path: str):
    self.path = path

  def create(self, data: bytes) -> bool:
    """Creates the file with `data`; False if it already exists."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def read(self) -> bytes | None:
    try:
      with open(self.path, "rb") as f:
        return f.read()
    except OSError:
      return None

  def mtime(self) -> float:
    try:
      return os.path.getmtime(self.path)
    except OSError:
      return 0.0

  def overwrite(self, data: bytes, token: str) -> None:
    temporary = f"{self.path}.beat-{token}"
    with open(temporary, "wb") as f:
      f.write(data)
    os.replace(temporary, self.path)

  def remove(self) -> None:
    os.remove(self.path)

  def take_away(self, token: str, by: str) -> LockInfo | None:
    """Removes the lock if it still holds `token` (the stale holder's); returns the lock found
    instead, left in place, if another process took it meanwhile. by: the taker's token."""
    moved = f"{self.path}.stale-{by}"
    try:
      os.rename(self.path, moved)
    except FileNotFoundError:
      return None  # another contender moved it first; try creating again
    with open(moved, "rb") as f:
      taken = _parse(f.read())
    if taken is not None and taken.token != token:  # a live lock slipped in
      os.rename(moved, self.path)
      return taken
    os.remove(moved)
    return None


class _ObjectLockFile:
  """The lock object on Cloud Storage (see the module docstring for what is atomic)."""

  def __init__(self, path: str):
    self.path = path
    self._fs, self._key = fsspec.core.url_to_fs(path)

  def create(self, data: bytes) -> bool:
    try:
      self._fs.pipe_file(self._key, data, mode="create")  # ifGenerationMatch=0
    except FileExistsError:
      return False
    return True

  def read(self) -> bytes | None:
    try:
      return self._fs.cat_file(self._key)
    except FileNotFoundError:
      return None

  def mtime(self) -> float:
    try:
      return self._fs.modified(self._key).timestamp()
    except FileNotFoundError:
      return 0.0

  def overwrite(self, data: bytes, token: str) -> None:  # pylint: disable=unused-argument
    self._fs.pipe_file(self._key, data)  # an object is replaced whole

  def remove(self) -> None:
    self._fs.rm_file(self._key)

  def take_away(self, token: str, by: str) -> LockInfo | None:  # pylint: disable=unused-argument
    """As _LocalLockFile.take_away, with the race of the module docstring."""
    data = self.read()
    if data is None:
      return None
    current = _parse(data)
    if current is not None and current.token != token:
      return current
    try:
      self.remove()
    except FileNotFoundError:
      pass
    return None


def _lock_file(path: str) -> _LocalLockFile | _ObjectLockFile:
  return _ObjectLockFile(path) if storage.is_remote(path) else _LocalLockFile(path)


def read_lock(path: str) -> LockInfo | None:
  """The lock file's contents, or None if it is missing or unreadable (e.g. half written)."""
  return _parse(_lock_file(os.fspath(path)).read())


def stale_reason(info: LockInfo, *, stale_after: float) -> str | None:
  """Why the holder described by `info` is gone, or None if it may still be running."""
  if info.host == socket.gethostname():
    if not pid_running(info.pid):
      return f"pid {info.pid} is not running"
    ticks = process_start_ticks(info.pid)
    if info.start_ticks is not None and ticks is not None and ticks != info.start_ticks:
      return f"pid {info.pid} now belongs to another process"
    return None
  age = time.time() - info.heartbeat
  return f"no heartbeat for {age:.0f} s" if age > stale_after else None


def _describe(info: LockInfo) -> str:
  return (f"pid {info.pid} on host {info.host} since {_format_time(info.since)} "
          f"(last heartbeat {time.time() - info.heartbeat:.0f} s ago)")


class WorkdirLock:
  """Context manager holding <workdir>/train.lock; see the module docstring.

  heartbeat_every: seconds between heartbeats; stale_after: heartbeat age after which a
  holder on another host counts as gone (keep it well above heartbeat_every and any clock
  skew between hosts).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               heartbeat_every: float = 30.0, stale_after: float = 300.0,
               name: str = LOCK_FILE):
    if not 0 < heartbeat_every < stale_after:
      raise ValueError(f"WorkdirLock needs 0 < heartbeat_every ({heartbeat_every}) < "
                       f"stale_after ({stale_after})")
    self.workdir = os.fspath(workdir)
    self.path = str(epath.Path(self.workdir) / name)
    self._file = _lock_file(self.path)
    self.enabled = enabled
    self.heartbeat_every, self.stale_after = heartbeat_every, stale_after
    self._info: LockInfo | None = None
    self._created_workdir = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # -- taking the lock -----------------------------------------------------------------------
  def acquire(self) -> None:
    """Takes the lock (or a stale one over); raises WorkdirLockedError if it is held."""
    if not self.enabled:
      return
    if not storage.is_remote(self.workdir) and not os.path.isdir(self.workdir):
      os.makedirs(self.workdir)  # (an object store has no directories to create)
      self._created_workdir = True
    now = time.time()
    self._info = LockInfo(socket.gethostname(), os.getpid(), process_start_ticks(os.getpid()),
                          now, now, uuid.uuid4().hex)
    for _ in range(_TAKEOVER_ATTEMPTS):
      if self._create():
        self._start_heartbeat()
        return
      self._remove_if_stale()
    raise WorkdirLockedError(f"could not take {self.path}: other processes keep taking it")

  def _create(self) -> bool:
    """Creates the lock file with our info; False if it already exists."""
    return self._file.create(_encode(self._info))

  def _remove_if_stale(self) -> None:
    """Removes a stale lock (so that creating it can be tried again); raises
    WorkdirLockedError if the holder may be alive."""
    holder = _parse(self._file.read())
    if holder is None:
      holder = self._unreadable_holder()
    reason = stale_reason(holder, stale_after=self.stale_after)
    if reason is None:
      raise WorkdirLockedError(f"workdir {self.workdir} is in use by {_describe(holder)}; "
                               f"stop that run or use another --workdir (lock: {self.path})")
    taken = self._file.take_away(holder.token, by=self._info.token)
    if taken is not None:
      raise WorkdirLockedError(f"workdir {self.workdir} is in use by {_describe(taken)}")
    _LOG.warning("took over the stale lock %s of %s: %s", self.path, _describe(holder), reason)

  def _unreadable_holder(self) -> LockInfo:
    """A lock file without valid contents: a holder between creating and writing it (fresh),
    or one that died there (old); judged by the file's age like a foreign holder."""
    mtime = self._file.mtime()
    return LockInfo("(unknown)", -1, None, mtime, mtime, "")

  # -- heartbeat -----------------------------------------------------------------------------
  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_every):
      if not self._refresh():
        return

  def _refresh(self) -> bool:
    """Rewrites the lock with a new heartbeat (atomic replace); False if it is not ours."""
    current = _parse(self._file.read())
    if current is None or current.token != self._info.token:
      _LOG.error("lock %s was taken over by %s", self.path,
                 _describe(current) if current else "another process")
      return False
    self._info = self._info._replace(heartbeat=time.time())
    self._file.overwrite(_encode(self._info), self._info.token)
    return True

  # -- releasing -----------------------------------------------------------------------------
  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours; removes the workdir
    again if this lock created it and nothing else was written."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    current = _parse(self._file.read())
    if self._info is not None and current is not None and current.token == self._info.token:
      self._file.remove()
    self._info = None
    if self._created_workdir:
      self._created_workdir = False
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass  # not empty: the run wrote something

  def acquire_waiting(self, what: str, poll_s: float = 1.0, log_every_s: float = 30.0) -> None:
    """Takes the lock, waiting (and logging whom for) while a live holder has it."""
    start = last = time.monotonic()
    while True:
      try:
        self.acquire()
        return
      except WorkdirLockedError as error:
        if time.monotonic() - last >= log_every_s:
          last = time.monotonic()
          _LOG.info("waiting %.0f s for %s: %s", last - start, what, error)
      time.sleep(poll_s)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
