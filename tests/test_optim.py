"""Tests for lm1b.optim: schedules, weight-decay mask, gradient accumulation."""


import jax
import jax.numpy as jnp
import flax.linen as nn
import gin
import numpy as np
import optax
import pytest

from lm1b import optim, run_config
from lm1b.errors import ConfigError


def test_rsqrt_schedule_values():
  schedule = optim.make_schedule(learning_rate=2e-3, warmup_steps=100, decay="rsqrt")
  for step, expected in [(0, 0.0), (50, 1e-3), (100, 2e-3), (400, 1e-3), (10_000, 2e-4)]:
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-12)
  assert schedule(jnp.int32(7)).dtype == jnp.float32


def test_cosine_and_constant_schedule_values():
  cosine = optim.make_schedule(learning_rate=1.0, warmup_steps=10, decay="cosine",
                               total_steps=110, final_fraction=0.1)
  for step, expected in [(5, 0.5), (10, 1.0), (60, 0.55), (110, 0.1), (500, 0.1)]:
    np.testing.assert_allclose(float(cosine(step)), expected, rtol=1e-5)
  constant = optim.make_schedule(learning_rate=0.3, warmup_steps=0, decay="constant")
  assert float(constant(0)) == pytest.approx(0.3) and float(constant(10**6)) == pytest.approx(0.3)
  jitted = jax.jit(cosine)(jnp.arange(3))
  np.testing.assert_allclose(np.asarray(jitted), [0.0, 0.1, 0.2], atol=1e-7)


def test_schedule_errors():
  with pytest.raises(ConfigError, match="'linear'"):
    optim.make_schedule(decay="linear")
  with pytest.raises(ConfigError, match="total_steps"):
    optim.make_schedule(decay="cosine", warmup_steps=10)
  with pytest.raises(ConfigError, match=r"warmup_steps=100 is not shorter than the run's 100"):
    optim.make_schedule(100, warmup_steps=100)
  with pytest.raises(ConfigError, match="grad_accum_steps=0"):
    optim.make_optimizer(10, grad_accum_steps=0)


def test_optimizer_schedule_counts_applied_updates():
  options = dict(decay="cosine", warmup_steps=10, learning_rate=1.0)
  optimizer = optim.make_optimizer(440, grad_accum_steps=4, schedule_options=options)
  assert optimizer.grad_accum_steps == 4  # 110 updates
  assert float(optimizer.schedule(110)) == pytest.approx(0.0, abs=1e-7)  # cosine ends at 110
  assert float(optimizer.schedule(60)) == pytest.approx(0.5, rel=1e-5)
  with pytest.raises(ConfigError, match="warmup_steps=10 is not shorter than the run's 10"):
    optim.make_optimizer(40, grad_accum_steps=4, schedule_options=options)


def test_run_configuration_gives_the_optimizer_its_schedule_and_names_bindings():
  gin.parse_config(["make_schedule.decay = 'cosine'", "make_schedule.warmup_steps = 10",
                    "make_schedule.learning_rate = 1.0", "make_optimizer.grad_accum_steps = 4",
                    "train_and_evaluate.num_steps = 440"])
  run = run_config.build()
  optimizer = run.optimizer(run.loop.num_steps, schedule_options=run.schedule.values)
  assert float(optimizer.schedule(60)) == pytest.approx(0.5, rel=1e-5)
  with pytest.raises(ConfigError) as error:
    run.optimizer(40, schedule_options=run.schedule.values)
  assert run_config.describe_error(error.value).startswith(
      "make_schedule.warmup_steps=10 is not shorter")
  with pytest.raises(ConfigError) as error:
    optim.make_optimizer(10, grad_accum_steps=0)
  assert run_config.describe_error(error.value).startswith("make_optimizer.grad_accum_steps=0")


def test_weight_decay_mask():
  params = {"embed": {"embedding": jnp.ones((5, 4))},
            "block": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
                      "norm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
                      "odd": {"scale": jnp.ones((2, 4))},
                      "attention": {"relative_bias": jnp.ones((3, 7, 2))}},
            "scalar": jnp.ones(())}
  mask = optim.weight_decay_mask(params)
  assert mask == {"embed": {"embedding": True},
                  "block": {"dense": {"kernel": True, "bias": False},
                            "norm": {"scale": False, "bias": False},
                            "odd": {"scale": False},
                            "attention": {"relative_bias": False}},
                  "scalar": False}
  # Flax logically-partitioned (boxed) parameters get a mask of the same boxed structure.
  boxed = {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 3)), ("embed", "mlp")),
           "bias": nn.LogicallyPartitioned(jnp.ones((3,)), ("mlp",))}
  assert nn.unbox(optim.weight_decay_mask(boxed)) == {"kernel": True, "bias": False}


def test_weight_decay_applies_only_to_masked_params():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  tx = optim.make_optimizer(1, schedule=0.1, weight_decay=0.5, clip_norm=0.0).tx
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], np.zeros(2), atol=0)


def _linear_loss(params, x, y):
  pred = x @ params["w"] + params["b"]
  return jnp.mean((pred - y) ** 2)


def test_gradient_accumulation_matches_big_batch():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(12, 2)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros((2,))}
  schedule = optim.make_schedule(learning_rate=0.1, warmup_steps=2, decay="constant")
  grad = jax.grad(_linear_loss)

  big = optim.make_optimizer(3, schedule=schedule, clip_norm=0.5).tx
  big_params, big_state = params, big.init(params)
  acc = optim.make_optimizer(9, schedule=schedule, clip_norm=0.5, grad_accum_steps=3).tx
  acc_params, acc_state = params, acc.init(params)
  for _ in range(3):  # three optimizer steps
    updates, big_state = big.update(grad(big_params, x, y), big_state, big_params)
    big_params = optax.apply_updates(big_params, updates)
    for micro in range(3):
      rows = slice(4 * micro, 4 * micro + 4)
      updates, acc_state = acc.update(grad(acc_params, x[rows], y[rows]), acc_state, acc_params)
      acc_params = optax.apply_updates(acc_params, updates)
  assert not np.allclose(big_params["w"], params["w"])
  for key in params:
    np.testing.assert_allclose(acc_params[key], big_params[key], rtol=1e-5, atol=1e-6)
