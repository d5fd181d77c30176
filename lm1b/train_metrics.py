"""Training metrics between two progress lines: the window of step metrics and the
finite-loss check.

The train step returns its metrics as device scalars (loss_sum, weight_sum, nll_sum,
grad_norm, learning_rate, finite); `MetricsWindow.add` keeps them on the device, `drain`
fetches every pending step at once (the regular host synchronisation of the loop), checks
that each loss and the parameters were finite and adds them to the window's totals, and
`close` returns the window's averages and starts the next window. Throughput is measured
by lm1b.throughput.
"""

import math
from typing import Callable

import jax

from lm1b import metrics as metrics_lib

_SUMMED = ("loss_sum", "weight_sum", "nll_sum", "grad_norm")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or parameters; the message names the step."""


class MetricsWindow:
  """Step metrics since the last progress line, and the training loss of every step."""

  def __init__(self):
    self.losses: dict[int, float] = {}   # step -> training loss, every step drained
    self._pending: list[tuple[int, dict]] = []
    self._totals: dict[str, float] = {}

  def add(self, step: int, step_metrics: dict) -> None:
    """Keeps the metrics of `step` (device arrays) until the next drain."""
    self._pending.append((step, step_metrics))

  def drain(self, last_checkpoint: Callable[[], str]) -> None:
    """Fetches the pending step metrics, checks them and adds them to the totals.

    Raises NonFiniteLossError naming the first step whose loss or parameters are not
    finite; last_checkpoint() says where the last good checkpoint is, for its message.
    """
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    pending, self._pending = self._pending, []
    for (step, _), values in zip(pending, fetched):
      loss = float(values["loss_sum"]) / max(float(values["weight_sum"]), 1.0)
      if not values["finite"] or not math.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) or parameters at step {step}; stopped without "
            f"saving it (last checkpoint: {last_checkpoint()})")
      self.losses[step] = loss
      for key in _SUMMED:
        self._totals[key] = self._totals.get(key, 0.0) + float(values[key])
      self._totals["steps"] = self._totals.get("steps", 0) + 1
      self._totals["learning_rate"] = float(values["learning_rate"])

  def close(self) -> dict[str, float] | None:
    """The drained window's loss, per-token perplexity, last learning rate and mean gradient
    norm, plus 'real_tokens' (its target tokens); None for an empty window. Starts the next
    window."""
    totals, self._totals = self._totals, {}
    if not totals:
      return None
    weight = max(totals["weight_sum"], 1.0)
    return {
        "loss": totals["loss_sum"] / weight,
        "per_token_perplexity": metrics_lib.perplexity(totals["nll_sum"] / weight),
        "learning_rate": totals["learning_rate"],
        "grad_norm": totals["grad_norm"] / totals["steps"],
        "real_tokens": totals["weight_sum"],
    }
