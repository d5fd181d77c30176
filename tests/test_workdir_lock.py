"""Tests for lm1b.workdir_lock: refusal naming the holder (in-process and across processes),
stale locks (kill -9, pid reuse, silent foreign host) taken over, release on any exit."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lm1b import workdir_lock
from lm1b.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLDER = r"""
import sys
from lm1b.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("HELD", flush=True)
  sys.stdin.read()  # until the test closes stdin (or kills us)
"""


def _start_holder(workdir) -> subprocess.Popen:
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)],
                            env=dict(os.environ, PYTHONPATH=REPO), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  assert holder.stdout.readline() == "HELD\n"
  return holder


def test_second_holder_in_this_process_is_refused_naming_the_holder(tmp_path):
  with WorkdirLock(tmp_path) as lock:
    info = workdir_lock.read_lock(lock.path)
    assert (info.host, info.pid) == (socket.gethostname(), os.getpid())
    with pytest.raises(WorkdirLockedError) as raised:
      WorkdirLock(tmp_path).acquire()
    message = str(raised.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()} since " in message
    assert str(tmp_path) in message and "\n" not in message
    assert workdir_lock.read_lock(lock.path) == info  # the holder's file is untouched
  assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_a_live_process_is_refused_and_taken_over_after_kill_9(tmp_path, caplog):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(WorkdirLockedError, match=f"in use by pid {holder.pid} on host "):
      WorkdirLock(tmp_path).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert workdir_lock.read_lock(str(tmp_path / LOCK_FILE)).pid == holder.pid  # left behind
  with caplog.at_level(logging.WARNING, logger="lm1b.workdir_lock"):
    with WorkdirLock(tmp_path):
      assert workdir_lock.read_lock(str(tmp_path / LOCK_FILE)).pid == os.getpid()
  (record,) = caplog.records
  assert f"pid {holder.pid}" in record.getMessage()
  assert f"pid {holder.pid} is not running" in record.getMessage()
  assert sorted(os.listdir(tmp_path)) == []  # no stale or temporary files left


def test_released_when_the_block_raises_and_after_a_clean_exit_of_a_process(tmp_path):
  with pytest.raises(KeyError):
    with WorkdirLock(tmp_path):
      raise KeyError("boom")
  assert not (tmp_path / LOCK_FILE).exists()
  holder = _start_holder(tmp_path)
  holder.communicate("")  # stdin closed: the holder leaves its with block
  assert holder.returncode == 0 and not (tmp_path / LOCK_FILE).exists()


def _write_lock(workdir, **fields):
  info = dict(host=socket.gethostname(), pid=os.getpid(),
              start_ticks=workdir_lock.process_start_ticks(os.getpid()), since=time.time(),
              heartbeat=time.time(), token="other")
  info.update(fields)
  (workdir / LOCK_FILE).write_text(json.dumps(info))


@pytest.mark.parametrize("fields, stale", [
    ({"host": "elsewhere", "heartbeat": time.time() - 1000}, True),
    ({"host": "elsewhere"}, False),
    ({"start_ticks": -1}, True),  # our pid, but another process start: pid reused
    ({}, False),  # this very process holds it
])
def test_stale_locks_by_host_heartbeat_and_pid_reuse(tmp_path, fields, stale):
  _write_lock(tmp_path, **fields)
  lock = WorkdirLock(tmp_path, heartbeat_every=1, stale_after=60)
  if stale:
    with lock:
      assert workdir_lock.read_lock(lock.path).token != "other"
  else:
    with pytest.raises(WorkdirLockedError, match="in use by pid"):
      lock.acquire()
    assert workdir_lock.read_lock(lock.path).token == "other"


def test_heartbeat_is_refreshed_and_workdir_created_only_if_missing(tmp_path):
  workdir = tmp_path / "new"
  with WorkdirLock(workdir, heartbeat_every=0.05, stale_after=1) as lock:
    first = workdir_lock.read_lock(lock.path)
    time.sleep(0.3)
    later = workdir_lock.read_lock(lock.path)
    assert later.heartbeat > first.heartbeat and later.since == first.since
  assert not workdir.exists()  # created by the lock, nothing else written: removed again
  with WorkdirLock(workdir):
    (workdir / "config.gin").write_text("x")
  assert sorted(os.listdir(workdir)) == ["config.gin"]


def test_disabled_lock_does_nothing(tmp_path):
  _write_lock(tmp_path, token="held")
  with WorkdirLock(tmp_path, enabled=False):
    pass
  assert workdir_lock.read_lock(str(tmp_path / LOCK_FILE)).token == "held"
  with pytest.raises(ValueError, match="heartbeat_every"):
    WorkdirLock(tmp_path, heartbeat_every=10, stale_after=5)
