"""Several processes (hosts): the distributed runtime, and the lost-peer exit for errors that
reach Python (a collective failing because a peer is gone).

The other way a peer's loss shows, the runtime aborting this process from its own thread, is
reported by the parent process (`supervisor`).
"""

import os
import re
import sys

import jax
from etils import epath

from lm1b import supervisor

# What a lost peer looks like in an error raised by a collective or the coordination client.
_PEER_LOSS = re.compile(
    r"Gloo .*(closed by peer|reset by peer|Read error|Connection refused|Broken pipe|Timed out)"
    r"|heartbeat timeout|stopped sending heartbeats|Barrier failed|task is set to ERROR",
    re.IGNORECASE)

_checkpoint_dir: epath.Path | None = None


def initialize(checkpoint_dir: epath.PathLike | None = None) -> None:
  """`jax.distributed.initialize` (gloo collectives on CPU), before anything touches a device.

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID are
  passed on when set (e.g. several CPU processes on one machine); unset values are left to
  jax's cluster auto-detection (Cloud TPU, SLURM, ...). `checkpoint_dir` is where the lost-peer
  line looks for the step a rerun resumes from. The process's index goes to its native log,
  where the supervising parent reads it.
  """
  global _checkpoint_dir
  _checkpoint_dir = epath.Path(checkpoint_dir) if checkpoint_dir else None
  env = os.environ
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
      num_processes=int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None,
      process_id=int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None,
      heartbeat_timeout_seconds=supervisor.HEARTBEAT_SECONDS)
  if supervisor.is_child():
    os.write(2, (_this_process() + "\n").encode())  # fd 2 is the native log in the child


def _this_process() -> str:
  return supervisor.PROCESS_LINE.format(index=jax.process_index(), count=jax.process_count())


def is_peer_loss(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, says a peer process is gone."""
  if not jax.distributed.is_initialized():
    return False
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if _PEER_LOSS.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def exit_if_peer_lost(error: BaseException, verbose: bool = False) -> None:
  """For an error that says a peer is gone: prints one line and ends the process at once.

  `os._exit` skips the runtime's shutdown barrier, which a lost peer can never complete (it
  would wait out the shutdown timeout and then abort with a C++ dump). Checkpoints are written
  through temporary paths, and a step left damaged is moved aside on resume.
  """
  if not is_peer_loss(error):
    return
  if verbose:
    print(str(error), file=sys.stderr)
  line = supervisor.lost_peer_line(f"{_this_process()}\n{error}",
                                   supervisor.latest_step(_checkpoint_dir),
                                   supervisor.native_log_path())
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(supervisor.EXIT_LOST_PEER)  # pylint: disable=protected-access
