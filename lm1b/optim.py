"""Learning-rate schedules and the AdamW optimizer."""

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm1b.errors import ConfigError

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]
DECAYS = ("rsqrt", "cosine", "constant")
# Logit biases by relative position (lm1b.model) are biases too: decay would also pull the
# per-level discount (ModelConfig.relative_bias_level_discount) back to zero.
_NO_DECAY_NAMES = ("bias", "scale", "relative_bias")


class Optimizer(NamedTuple):
  """The optimizer of a run: the optax transformation, its learning-rate schedule (of the
  number of applied updates) and how many train steps make one update."""
  tx: optax.GradientTransformation
  schedule: Schedule
  grad_accum_steps: int


def make_schedule(num_updates: int | None = None, *, learning_rate: float = 1e-3,
                  warmup_steps: int = 1000, decay: str = "rsqrt",
                  total_steps: int | None = None, final_fraction: float = 0.0) -> Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay` (optax
  schedules, joined at the end of the warmup).

  rsqrt:    learning_rate * sqrt(warmup_steps / step) after warmup.
  cosine:   half cosine from learning_rate to learning_rate * final_fraction at total_steps,
            constant afterwards (needs total_steps > warmup_steps).
  constant: learning_rate after warmup.
  num_updates: the optimizer updates of the run, if known: total_steps defaults to it, and a
  warmup that the run would never finish is a ConfigError.
  Returns a function of the (int) step giving a float32 scalar; usable under jit.
  """
  if decay not in DECAYS:
    raise ConfigError(f"decay={decay!r} is unknown; expected one of {DECAYS}",
                      owner=make_schedule)
  if warmup_steps < 0:
    raise ConfigError(f"warmup_steps={warmup_steps} must be >= 0", owner=make_schedule)
  if num_updates is not None and warmup_steps >= num_updates:
    raise ConfigError(f"warmup_steps={warmup_steps} is not shorter than the run's "
                      f"{num_updates} optimizer updates (train steps / grad_accum_steps): the "
                      "warmup would never finish", owner=make_schedule)
  if total_steps is None:
    total_steps = num_updates
  if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ConfigError(f"decay='cosine' needs total_steps > warmup_steps={warmup_steps}, got "
                      f"total_steps={total_steps}", owner=make_schedule)
  warm = float(max(warmup_steps, 1))
  if decay == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, total_steps - warmup_steps,
                                        alpha=final_fraction)
  elif decay == "constant":
    after = optax.constant_schedule(learning_rate)
  else:
    def after(count):  # count: updates since the end of the warmup
      return learning_rate * jnp.sqrt(warm / jnp.maximum(count + warmup_steps, warm))

  def warmup(count):
    # learning_rate * count / warmup_steps; optax.linear_schedule computes it as
    # lr - lr * (1 - count / warmup_steps), which loses digits for small counts.
    return learning_rate * jnp.minimum(1.0, count / warm)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _last_name(path) -> str:
  """Name of the innermost dict key / attribute on a pytree path ('' if none)."""
  for entry in reversed(path):
    if isinstance(entry, jax.tree_util.DictKey):
      return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name != "value":
      return entry.name
  return ""


def weight_decay_mask(params: Any) -> Any:
  """Pytree of bools like params: True where weight decay applies.

  Excluded: every parameter with ndim < 2 (biases, LayerNorm scales, scalars) and any leaf
  named 'bias', 'scale' or 'relative_bias' whatever its rank.
  """
  def decays(path, leaf):
    return jnp.ndim(leaf) >= 2 and _last_name(path) not in _NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(num_steps: int, *, schedule: Schedule | float | None = None,
                   schedule_options: Mapping[str, Any] | None = None, weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-9, grad_accum_steps: int = 1) -> Optimizer:
  """Global-norm clipping then AdamW (decoupled weight decay on matrices only).

  num_steps: train steps of the run; the schedule (default: `make_schedule` with
  `schedule_options`) counts the num_steps // grad_accum_steps applied updates. clip_norm <= 0 disables
  clipping. With grad_accum_steps = k > 1 the chain is wrapped in optax.MultiSteps: gradients
  of k consecutive update() calls are averaged and applied once (the k - 1 intermediate calls
  return zero updates).
  """
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ConfigError(f"grad_accum_steps={grad_accum_steps!r} must be an int >= 1",
                      owner=make_optimizer)
  if schedule is None:
    schedule = make_schedule(max(num_steps // grad_accum_steps, 1), **(schedule_options or {}))
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
  if not callable(schedule):
    schedule = optax.constant_schedule(schedule)
  return Optimizer(tx, schedule, grad_accum_steps)
