"""Training throughput: real tokens per second, the fill of the token slots and MFU.

Real tokens are targets with weight 1; `fill` is the share of token slots (rows x seq_len)
that hold real tokens; MFU is given both on real tokens and on all slots (the model computes
every slot, padding included), against the devices' summed peak FLOP/s.
"""

import contextlib
import time
from typing import Iterator

import jax

from lm1b import flops


class Throughput:
  """Real tokens, slots and time of the steps since the last report (compilation excluded)."""

  def __init__(self, slots_per_step: int, flops_per_slot: float, peak_flops: float | None):
    self.slots_per_step, self.flops_per_slot = slots_per_step, flops_per_slot
    self.peak_flops = peak_flops
    self.restart(0)

  def restart(self, step: int) -> None:
    self.start_step, self.start_time, self.excluded = step, time.perf_counter(), 0.0

  @contextlib.contextmanager
  def untimed(self) -> Iterator[None]:
    """Time spent inside (evaluation, samples, checkpoint starts) is not counted."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.excluded += time.perf_counter() - start

  def report(self, step: int, real_tokens: float) -> dict[str, float]:
    """tokens_per_sec (real), fill, steps_per_sec, step_time_sec and the two MFUs."""
    steps_done = step - self.start_step
    elapsed = time.perf_counter() - self.start_time - self.excluded
    if steps_done <= 0 or elapsed <= 0:
      return {}
    slots = steps_done * self.slots_per_step
    values = {"tokens_per_sec": real_tokens / elapsed, "fill": real_tokens / slots,
              "steps_per_sec": steps_done / elapsed, "step_time_sec": elapsed / steps_done}
    if self.peak_flops:
      values["mfu_real_tokens"] = real_tokens / elapsed * self.flops_per_slot / self.peak_flops
      values["mfu_all_slots"] = slots / elapsed * self.flops_per_slot / self.peak_flops
    return values


def resolve_peak_flops(configured: float | None, dtype) -> float | None:
  """Summed peak FLOP/s of all devices: configured per device, else the device-kind table
  (None where unknown, e.g. on CPU: then no MFU is reported)."""
  devices = jax.devices()
  if configured is not None:
    return configured * len(devices)
  peaks = [flops.peak_flops(d.device_kind, dtype) for d in devices]
  return None if any(p is None for p in peaks) else float(sum(peaks))
