"""Tests for lm1b.loss: the weighted cross-entropy and label smoothing."""

import math

import jax
import numpy as np

from lm1b import loss as loss_lib


def _manual_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_cross_entropy_matches_manual_and_ignores_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 5))
  weights = np.ones((2, 5), np.float32)
  weights[1, 3:] = 0.0
  log_probs = _manual_log_softmax(logits)
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  expected = (nll * weights).sum()

  loss, total, plain = jax.jit(loss_lib.cross_entropy_loss)(logits, targets, weights)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(plain), expected, rtol=1e-5)
  assert float(total) == 8.0
  # Changing padded positions changes nothing.
  changed = logits.copy()
  changed[1, 3:] = 1e4
  targets_changed = targets.copy()
  targets_changed[1, 3:] = 0
  again = loss_lib.cross_entropy_loss(changed, targets_changed, weights)
  np.testing.assert_allclose(float(again[0]), expected, rtol=1e-5)
  assert all(math.isfinite(float(v)) for v in again)


def test_label_smoothing():
  rng = np.random.default_rng(2)
  vocab, smoothing = 6, 0.2
  logits = rng.normal(size=(1, 4, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(1, 4))
  weights = np.ones((1, 4), np.float32)
  q = np.full((1, 4, vocab), smoothing / (vocab - 1))
  np.put_along_axis(q, targets[..., None], 1 - smoothing, -1)
  entropy = -(q[0, 0] * np.log(q[0, 0])).sum()
  expected = (-(q * _manual_log_softmax(logits)).sum(-1) - entropy).sum()
  loss, _, plain = loss_lib.cross_entropy_loss(logits, targets, weights, label_smoothing=smoothing)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  nll = -np.take_along_axis(_manual_log_softmax(logits), targets[..., None], -1).sum()
  np.testing.assert_allclose(float(plain), nll, rtol=1e-5)
  # The smoothed loss is 0 when the model predicts the smoothed targets exactly.
  perfect = loss_lib.cross_entropy_loss(np.log(q).astype(np.float32), targets, weights,
                                        label_smoothing=smoothing)[0]
  assert abs(float(perfect)) < 1e-5
