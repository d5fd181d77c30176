"""A lost host: every surviving process ends within a bounded time with one line (which process,
the newest checkpoint step, rerun to resume), no C++ dump, traceback or Gloo per-rank lines;
and the pieces that make it so (the supervising parent, the native-output file, the line)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lm1b import supervisor
from test_sharded import MESH, free_port, launch
from test_train import REPO, micro, micro_params, subprocess_env  # noqa: F401

# Text the runtime writes before it aborts a survivor (abridged from a real run).
COORDINATOR_GONE = """lm1b: this is process 1 of 2
W1202 18:53:59.290899   11511 preemption_sync_manager.cc:147] Failed to retrieve preemption \
notice from coordination service: UNAVAILABLE: Socket closed
E1202 18:53:59.291111   11511 coordination_service_agent.cc:289] Polled an error from \
coordination service (this can be an error from this or another task).
"""
HEARTBEAT_TIMEOUT = """lm1b: this is process 0 of 4
E1202 18:46:02.484438    9317 coordination_service.cc:1549] Use error polling to propagate the \
following error to all tasks: UNAVAILABLE: Task 3 heartbeat timeout. This indicates that the \
remote task has failed
F1202 18:46:02.484892    9335 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors.
"""
CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)
LOST_LINE = re.compile(r"^error: process (\d) of 2 lost contact with .*; rerunning the same "
                       r"command on every host resumes from step (\d+) \(runtime messages: "
                       r"(\S+)\)$", re.M)


@pytest.mark.parametrize("text, where, who", [
    (COORDINATOR_GONE, "process 1 of 2", "the coordinator (process 0)"),
    (HEARTBEAT_TIMEOUT, "process 0 of 4", "process 3"),
    ("Gloo AllGather failed: Connection closed by peer", "this process", "another process"),
])
def test_the_line_names_both_processes_where_the_runtime_says(text, where, who):
  line = supervisor.lost_peer_line(text, 40, "/tmp/native.log")
  assert line == (f"error: {where} lost contact with {who}; rerunning the same command on "
                  "every host resumes from step 40 (runtime messages: /tmp/native.log)")
  assert "starts again" in supervisor.lost_peer_line(text, None, None)


def test_latest_step_is_a_plain_listing(tmp_path):
  assert supervisor.latest_step(tmp_path / "missing") is None
  for name in ("4", "12", "8.orbax-checkpoint-tmp-1", "corrupt"):
    (tmp_path / name).mkdir()
  assert supervisor.latest_step(tmp_path) == 12


def test_a_child_aborted_by_the_runtime_becomes_one_line_and_exit_3(tmp_path, capfd):
  log = tmp_path / "native.log"
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  script = ("import os, sys; open(os.environ['LM1B_NATIVE_LOG'], 'a').write(sys.argv[1]); "
            "print('a line of its own', flush=True); os.abort()")
  code = supervisor.run_child(str(log), tmp_path / "checkpoints",
                              [sys.executable, "-c", script, HEARTBEAT_TIMEOUT])
  out, err = capfd.readouterr()
  assert code == supervisor.EXIT_LOST_PEER
  assert out == "a line of its own\n"
  assert err == ("error: process 0 of 4 lost contact with process 3; rerunning the same command "
                 f"on every host resumes from step 6 (runtime messages: {log})\n")


def test_a_child_killed_otherwise_names_the_signal(tmp_path, capfd):
  log = tmp_path / "native.log"
  code = supervisor.run_child(str(log), tmp_path, [sys.executable, "-c",
                                                   "import os; os.kill(os.getpid(), 9)"])
  assert code == 128 + signal.SIGKILL
  assert capfd.readouterr().err == f"error: the run ended on SIGKILL (runtime messages: {log})\n"


def test_native_writes_go_to_the_file_and_python_keeps_the_terminal(tmp_path):
  log = tmp_path / "native.log"
  script = ("import os, sys, logging; from lm1b import native_output; "
            f"native_output.divert({str(log)!r}); os.write(1, b'[Gloo] Rank 0\\n'); "
            "os.write(2, b'E1202 dump\\n'); print('python out'); "
            "logging.basicConfig(); logging.warning('python err')")
  run = subprocess.run([sys.executable, "-c", script], cwd=REPO, text=True,
                       capture_output=True, check=True)
  assert run.stdout == "python out\n"
  assert run.stderr == "WARNING:root:python err\n"
  assert log.read_text() == "[Gloo] Rank 0\nE1202 dump\n"


@pytest.mark.parametrize("victim", [0, 1])
def test_killing_one_of_two_processes_ends_the_other_in_one_line(micro, tmp_path, victim):
  corpus_dir, data_root = micro
  params = micro_params(corpus_dir, num_steps=100000, checkpoint_every=2, stop_check_every=4)
  env, port = subprocess_env(data_root), free_port()
  processes = [launch(tmp_path, params + MESH, env, devices=4, process=(i, 2, port))
               for i in range(2)]
  survivor = processes[1 - victim]
  try:
    early = []
    for line in processes[0].stdout:  # the chief prints progress
      early.append(line)
      if line.startswith("step 3/"):
        break
    deadline = time.monotonic() + 120  # the asynchronous save of step 2 becomes a step directory
    while supervisor.latest_step(tmp_path / "checkpoints") is None and time.monotonic() < deadline:
      time.sleep(0.2)
    processes[victim].kill()  # its child (the run itself) dies with it
    killed_at = time.monotonic()
    output = survivor.communicate(timeout=120)[0]
    seconds = time.monotonic() - killed_at
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  text = ("".join(early) if victim == 1 else "") + output
  assert survivor.returncode == supervisor.EXIT_LOST_PEER, text
  assert seconds < supervisor.HEARTBEAT_SECONDS, seconds
  errors = [line for line in output.splitlines() if "error" in line.lower()]
  match = LOST_LINE.search(output)
  assert match and len(errors) == 1, output
  assert int(match.group(1)) == 1 - victim
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert int(match.group(2)) == steps[-1] >= 2
  for noise in ("Traceback", "[Gloo]", "Terminating process", "Check failure"):
    assert noise not in text, text
  assert not CPP_LOG.search(text), text
  assert os.path.getsize(match.group(3)) > 0  # the runtime's messages were kept
