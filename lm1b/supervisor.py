"""Multi-process runs: the command runs as a child process; the parent reports how it ended.

When a peer process (a host) is lost, JAX's coordination client ends the survivors from one of
its own threads: it logs a C++ dump and aborts the process (SIGABRT), within a second when the
coordinator died and within the heartbeat timeout otherwise. Python cannot intercept that
(jaxlib's error callback cannot be given a Python function in this version: converting the
status fails with std::bad_cast), so the command runs as a child whose native output goes to a
file (`native_output`), and this parent, which touches no device, turns such an ending into one
line: which process was lost, the newest checkpoint step, and that rerunning the same command
resumes. Errors the child sees in Python (a collective failing) it reports itself, with the same
line and exit code (`distributed.exit_if_peer_lost`).

SIGTERM and SIGINT sent to the parent are passed to the child (which saves and stops as usual);
the child runs in its own session so that a terminal's Ctrl-C reaches it once, through the
parent, and it is killed if the parent dies.
"""

import ctypes
import os
import re
import signal
import subprocess
import sys

from etils import epath

CHILD_ENV = "LM1B_NATIVE_LOG"  # set in the child: the file its native output goes to
EXIT_LOST_PEER = 3
# A peer that vanishes without closing its connections is noticed after this long (jax's default).
HEARTBEAT_SECONDS = 100
PROCESS_LINE = "lm1b: this is process {index} of {count}"

_RUNTIME_ABORT = re.compile(r"JAX distributed service detected fatal errors"
                            r"|Polled an error from coordination service")
_LOST_TASK = re.compile(r"[Tt]ask (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)")
_COORDINATOR_GONE = re.compile(r"Socket closed|Connection refused|failed to connect", re.I)
_THIS_PROCESS = re.compile(PROCESS_LINE.format(index=r"(\d+)", count=r"(\d+)"))
_PR_SET_PDEATHSIG = 1


def is_child() -> bool:
  """Whether this process is the supervised child (its native log is set)."""
  return bool(os.environ.get(CHILD_ENV))


def native_log_path() -> str | None:
  return os.environ.get(CHILD_ENV) or None


def run_child(native_log: str, checkpoint_dir: epath.PathLike,
              command: list[str] | None = None) -> int:
  """Runs `command` (default: this same command line) as a child; returns its exit code, or
  EXIT_LOST_PEER with one line on stderr when the runtime ended it because a peer was lost."""
  command = command or [sys.executable, *sys.orig_argv[1:]]
  child = subprocess.Popen(command, env=dict(os.environ, **{CHILD_ENV: native_log}),
                           start_new_session=True, preexec_fn=_die_with_parent)
  previous = {signum: signal.signal(signum, lambda signum, _: child.send_signal(signum))
              for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    code = child.wait()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if code >= 0:
    return code
  log_tail = _tail(native_log)
  if _RUNTIME_ABORT.search(log_tail):
    print(lost_peer_line(log_tail, latest_step(checkpoint_dir), native_log), file=sys.stderr,
          flush=True)
    return EXIT_LOST_PEER
  name = signal.Signals(-code).name
  print(f"error: the run ended on {name} (runtime messages: {native_log})", file=sys.stderr,
        flush=True)
  return 128 - code


def lost_peer_line(runtime_text: str, checkpoint_step: int | None, native_log: str | None) -> str:
  """The one line for a lost peer, from the runtime's messages (`runtime_text`)."""
  this = _THIS_PROCESS.search(runtime_text)
  where = f"process {this.group(1)} of {this.group(2)}" if this else "this process"
  lost = _LOST_TASK.search(runtime_text)
  if lost:
    who = f"process {next(group for group in lost.groups() if group)}"
  elif _COORDINATOR_GONE.search(runtime_text):
    who = "the coordinator (process 0)"
  else:
    who = "another process"
  resume = (f"rerunning the same command on every host resumes from step {checkpoint_step}"
            if checkpoint_step is not None else
            "no checkpoint was saved yet, so rerunning the same command starts again")
  details = f"runtime messages: {native_log}" if native_log else "--verbose shows them"
  return f"error: {where} lost contact with {who}; {resume} ({details})"


def latest_step(directory: epath.PathLike | None) -> int | None:
  """The newest step directory's number in `directory` (a plain listing, no runtime)."""
  try:
    steps = [int(path.name) for path in epath.Path(directory).iterdir() if path.name.isdigit()]
  except (TypeError, OSError):
    return None
  return max(steps, default=None)


def _tail(path: str, size: int = 64 * 1024) -> str:
  try:
    with open(path, "rb") as file:
      file.seek(max(0, os.path.getsize(path) - size))
      return file.read().decode("utf-8", "replace")
  except OSError:
    return ""


def _die_with_parent() -> None:
  """In the child before exec (Linux): SIGKILL when the parent dies, as if one process."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):
    pass
