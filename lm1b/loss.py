"""The language-modelling loss: weighted cross-entropy with optional label smoothing."""

import jax
import jax.numpy as jnp


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
