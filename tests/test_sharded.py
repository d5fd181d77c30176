"""Sharded equivalence: the same training steps on 1 device, on 8 simulated devices with data,
fsdp and tensor parallelism, and as 2 processes x 4 devices (jax.distributed over 127.0.0.1,
gloo collectives) give the same losses, final evaluation and parameters to float tolerance.

The 8-device and 2-process runs are `python train.py` subprocesses (XLA reads the device-count
flag when jax starts); the 1-device run is in this process, while they run. All three share the
micro corpus and token cache of test_train's `micro` fixture.
"""

import json
import pathlib
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from lm1b import checkpoints, cli
from lm1b.workdir import Workdir
from test_train import (REPO, gin_flags, micro, micro_params, restored_params,  # noqa: F401
                        run_train, subprocess_env)

NUM_STEPS = 3
MESH = ["make_mesh.data = 2", "make_mesh.fsdp = 2", "make_mesh.tensor = 2"]
ONE_DEVICE = ["make_mesh.data = 1", "make_mesh.fsdp = 1", "make_mesh.tensor = 1"]
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def launch(workdir: pathlib.Path, params: list[str], env: dict, devices: int,
           process: tuple[int, int, int] | None = None) -> subprocess.Popen:
  """Starts `python train.py` on `devices` CPU devices; process = (id, count, port)."""
  env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if process is not None:
    process_id, count, port = process
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
               JAX_PROCESS_ID=str(process_id))
  command = [sys.executable, "train.py", "--workdir", str(workdir), *gin_flags(params)]
  return subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  """Waits for every process; returns their outputs, asserting each exited 0."""
  outputs = [process.communicate(timeout=timeout)[0] for process in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output
  return outputs


def tensorboard_losses(workdir: pathlib.Path) -> dict[int, float]:
  """{step: train/loss} read back from the run's event files (float32 values)."""
  accumulator = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  accumulator.Reload()
  return {event.step: event.value for event in accumulator.Scalars("train/loss")}


def final_params(workdir: pathlib.Path) -> list[np.ndarray]:
  """The latest checkpoint's parameters, restored onto this process's single device."""
  cli.parse_gin([str(Workdir(workdir).config)], ONE_DEVICE)
  return jax.tree.leaves(restored_params(workdir))


def final_eval(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / f"eval_test_{NUM_STEPS}.json").read_text())


def check_multiprocess_workdir(workdir: pathlib.Path, outputs: list[str]) -> None:
  """Process 0 alone printed progress and wrote summaries; the workdir is complete."""
  assert re.search(rf"step {NUM_STEPS}/{NUM_STEPS} ", outputs[0]), outputs[0]
  assert "2 process(es)" in outputs[0]
  assert not re.search(r"^step \d+/", outputs[1], re.MULTILINE), outputs[1]
  assert "Training tokenizer" not in outputs[1]  # process 0 trained it; process 1 loaded it
  assert len(list((workdir / "tensorboard").rglob("events.out.tfevents.*"))) == 1
  assert (workdir / "config.gin").is_file() and (workdir / "tokenizer.model").is_file()
  assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [NUM_STEPS]
  assert not list(workdir.glob(".tmp*"))


def test_one_device_eight_devices_and_two_processes_train_alike(micro, tmp_path):
  corpus_dir, data_root = micro
  params = micro_params(corpus_dir, num_steps=NUM_STEPS, checkpoint_every=NUM_STEPS)
  env, port = subprocess_env(data_root), free_port()
  runs = {
      "eight": [launch(tmp_path / "eight", params + MESH, env, devices=8)],
      "multi": [launch(tmp_path / "multi", params + MESH, env, devices=4, process=(i, 2, port))
                for i in range(2)],
  }
  try:
    single = run_train(tmp_path / "single", params + ONE_DEVICE)
    outputs = {name: finish(processes) for name, processes in runs.items()}
  finally:
    for process in [p for processes in runs.values() for p in processes]:
      if process.poll() is None:
        process.kill()
  assert "{'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu" in outputs["eight"][0]
  check_multiprocess_workdir(tmp_path / "multi", outputs["multi"])

  assert sorted(single.losses) == list(range(1, NUM_STEPS + 1))
  assert single.losses[NUM_STEPS] < single.losses[1]
  reference = final_params(tmp_path / "single")
  for name in runs:
    workdir = tmp_path / name
    losses = tensorboard_losses(workdir)
    assert sorted(losses) == sorted(single.losses), name
    for step, loss in single.losses.items():
      assert losses[step] == pytest.approx(loss, rel=LOSS_RTOL), (name, step)
    assert final_eval(workdir)["tokens"] == single.final_eval["tokens"]
    assert final_eval(workdir)["loss"] == pytest.approx(single.final_eval["loss"], rel=LOSS_RTOL)
    for ours, theirs in zip(reference, final_params(workdir), strict=True):
      np.testing.assert_allclose(theirs, ours, rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_sigterm_to_one_of_two_processes_stops_both_at_an_agreed_step(micro, tmp_path):
  corpus_dir, data_root = micro
  params = micro_params(corpus_dir, num_steps=100000, checkpoint_every=1000,
                        stop_check_every=4)
  env, port = subprocess_env(data_root), free_port()
  processes = [launch(tmp_path, params + MESH, env, devices=4, process=(i, 2, port))
               for i in range(2)]
  try:
    lines = []
    for line in processes[0].stdout:
      lines.append(line)
      if re.match(r"step \d+/100000", line):
        processes[0].send_signal(signal.SIGTERM)  # process 1 gets no signal
        break
    outputs = finish(processes)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  output = "".join(lines) + outputs[0]
  match = re.search(r"SIGTERM: saved checkpoint at step (\d+), exiting", output)
  assert match, output
  step = int(match.group(1))
  assert step % 4 == 0  # the step where both processes compared their flags
  assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [step]
