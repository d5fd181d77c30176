"""Shared helpers of the benchmark scripts: timing, machine description, tables."""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_DIR, "benchmarks", "results")


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` (its outputs are blocked on), after warm-up calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_ms(calls: Sequence[Callable[[], object]], rounds: int) -> list[list[float]]:
  """Wall ms of every call in every round, [len(calls)][rounds]: each round calls each once
  (blocking on its result), the order reversed every other round, so that all of them see the
  same machine load and the ratio within a round means something when absolute times drift."""
  times: list[list[float]] = [[] for _ in calls]
  order = list(enumerate(calls))
  for index in range(rounds):
    for position, call in order if index % 2 else order[::-1]:
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[position].append(1e3 * (time.perf_counter() - start))
  return times


def forward_and_backward(attention: Callable) -> dict[str, Callable]:
  """{"fwd": attention(q, k, v), "fwd+bwd": gradients of sum(attention) w.r.t. q, k, v}."""
  loss = lambda q, k, v: attention(q, k, v).sum()
  return {"fwd": attention, "fwd+bwd": jax.grad(loss, argnums=(0, 1, 2))}


def machine_description() -> str:
  """One line: devices, CPU count, platform, jax version, date."""
  devices = jax.devices()
  kind = devices[0].device_kind
  usable = len(os.sched_getaffinity(0))
  cores = f"{os.cpu_count()} CPU cores" + (f" ({usable} usable: taskset)"
                                          if usable != os.cpu_count() else "")
  return (f"{len(devices)} x {kind} ({jax.default_backend()}), {cores}, "
          f"{platform.platform()}, Python {platform.python_version()}, jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def command_line() -> str:
  """The command that ran this script, for the results file."""
  script = os.path.relpath(sys.argv[0], REPO_DIR)
  module = script.removesuffix(".py").replace(os.sep, ".")
  return " ".join(["python -m", module] + sys.argv[1:])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub markdown table; floats printed as given by the caller."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(path: str, title: str, sections: Sequence[str]) -> None:
  """Writes `# title`, the machine, the command and the sections to `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  header = [f"# {title}", "", f"Machine: {machine_description()}", "",
            f"Command: `{command_line()}`", ""]
  with open(path, "w", encoding="utf-8") as handle:
    handle.write("\n".join(header + list(sections)) + "\n")
  print(f"wrote {path}")


def merge_records(path: str, new: Sequence[dict], key: Callable[[dict], tuple]) -> list[dict]:
  """The records of JSON-lines file `path` with `new` merged in (a record whose key equals a
  new one's is replaced), written back to `path`; returns them all."""
  kept = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      kept = {key(r): r for r in (json.loads(line) for line in f if line.strip())}
  kept.update({key(r): r for r in new})
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept.values())
  return list(kept.values())
