"""Learning-rate schedules, the AdamW optimizer and the language-modelling loss."""

from typing import Any, Callable, NamedTuple

import gin
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


@gin.configurable(denylist=["num_updates"])
def make_schedule(num_updates: int | None = None, *, learning_rate: float = 1e-3,
                  warmup_steps: int = 1000, decay: str = "rsqrt",
                  total_steps: int | None = None, final_fraction: float = 0.0) -> Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay`.

  rsqrt:    learning_rate * sqrt(warmup_steps / step) after warmup.
  cosine:   half cosine from learning_rate to learning_rate * final_fraction at total_steps,
            constant afterwards (needs total_steps > warmup_steps).
  constant: learning_rate after warmup.
  num_updates: the optimizer updates of the run, if known: total_steps defaults to it, and a
  warmup that the run would never finish is a ConfigError.
  Returns a function of the (int) step giving a float32 scalar; usable under jit.
  """
  if decay not in DECAYS:
    raise ConfigError(f"make_schedule.decay={decay!r} is unknown; expected one of {DECAYS}")
  if warmup_steps < 0:
    raise ConfigError(f"make_schedule.warmup_steps={warmup_steps} must be >= 0")
  if num_updates is not None and warmup_steps >= num_updates:
    raise ConfigError(f"make_schedule.warmup_steps={warmup_steps} is not shorter than the "
                      f"run's {num_updates} optimizer updates (train_and_evaluate.num_steps / "
                      "make_optimizer.grad_accum_steps): the warmup would never finish")
  if total_steps is None:
    total_steps = num_updates
  if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ConfigError(f"make_schedule.decay='cosine' needs total_steps > warmup_steps="
                      f"{warmup_steps}, got total_steps={total_steps}")
  warm = float(max(warmup_steps, 1))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(1.0, step / warm) if warmup_steps > 0 else jnp.float32(1.0)
    if decay == "rsqrt":
      factor = jnp.sqrt(warm / jnp.maximum(step, warm))
    elif decay == "cosine":
      progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
      cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
      factor = final_fraction + (1.0 - final_fraction) * cosine
    else:
      factor = jnp.float32(1.0)
    return (learning_rate * ramp * factor).astype(jnp.float32)

  return schedule


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


@gin.configurable(denylist=["num_steps", "schedule"])
def make_optimizer(num_steps: int, *, schedule: Schedule | float | None = None,
                   weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-9, grad_accum_steps: int = 1) -> Optimizer:
  """Global-norm clipping then AdamW (decoupled weight decay on matrices only).

  num_steps: train steps of the run; the schedule (default: `make_schedule` with its gin
  bindings) counts the num_steps // grad_accum_steps applied updates. clip_norm <= 0 disables
  clipping. With grad_accum_steps = k > 1 the chain is wrapped in optax.MultiSteps: gradients
  of k consecutive update() calls are averaged and applied once (the k - 1 intermediate calls
  return zero updates).
  """
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ConfigError(f"make_optimizer.grad_accum_steps={grad_accum_steps!r} must be an int "
                      ">= 1")
  if schedule is None:
    schedule = make_schedule(max(num_steps // grad_accum_steps, 1))
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
  if not callable(schedule):
    schedule = optax.constant_schedule(schedule)
  return Optimizer(tx, schedule, grad_accum_steps)


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       label_smoothing: float = 0.0
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted sums of the training loss and of the plain negative log-likelihood.

  Args:
    logits: [B, L, V] float (computed in float32).
    targets: [B, L] int token ids.
    weights: [B, L] float, 0 on padding.
    label_smoothing: s in [0, 1); the target distribution puts 1 - s on the target and
      s / (V - 1) on every other token. The smoothed cross-entropy has its minimum
      (the target distribution's entropy) subtracted, so it is 0 for a perfect fit.

  Returns:
    (sum_loss, sum_weights, sum_nll): float32 scalars; sum_loss is the smoothed training
    loss, sum_nll the unsmoothed NLL (use sum_nll / sum_weights for perplexity).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  if label_smoothing > 0.0:
    vocab = logits.shape[-1]
    on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    # -sum_v q_v log p_v with q = off everywhere except on at the target.
    smoothed = (on - off) * nll - off * jnp.sum(log_probs, axis=-1)
    entropy = -(on * jnp.log(on) + (vocab - 1) * off * jnp.log(off))
    loss = smoothed - entropy
  else:
    loss = nll
  return jnp.sum(loss * weights), jnp.sum(weights), jnp.sum(nll * weights)
