"""The training loop's knobs: `LoopConfig` (gin: `train_and_evaluate`, see lm1b.run_config)."""

import dataclasses

from lm1b.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The loop's knobs (gin: `train_and_evaluate`, see lm1b.run_config); 0 disables an
  interval."""
  num_steps: int
  log_every: int = 50
  eval_every: int = 500
  eval_max_batches: int | None = None  # None: the whole test split
  sample_every: int = 1000
  sample_prompts: tuple[str, ...] = ("the",)
  sample_max_length: int | None = None
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  seed: int = 0
  label_smoothing: float = 0.0
  stop_check_every: int = 10
  peak_flops_per_device: float | None = None  # for MFU; default lm1b.flops's table

  def __post_init__(self):
    object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
    for name in ("num_steps", "checkpoint_every", "keep_checkpoints", "stop_check_every"):
      _check_int(self, name, 1, "a positive int")
    for name in ("log_every", "eval_every", "sample_every"):
      _check_int(self, name, 0, "an int >= 0 (0 disables)")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)",
                        owner=LoopConfig)


def _check_int(config: LoopConfig, name: str, least: int, wanted: str) -> None:
  """ConfigError unless the field `name` is an int (not a bool) >= least."""
  value = getattr(config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ConfigError(f"{name}={value!r} must be {wanted}", owner=LoopConfig)
