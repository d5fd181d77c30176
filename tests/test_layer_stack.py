"""Tests for lm1b.layer_stack: scanned layers and rematerialisation give the numbers of the
plain layer loop (losses, gradients, decoding), and a checkpoint of the other layout fails
with a line saying why."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm1b import checkpoints, layer_stack
from lm1b.errors import ConfigError
from lm1b.model import DecoderLM, ModelConfig

BASE = ModelConfig(vocab_size=64, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=32,
                   block_size=4, dtype="float32", dropout_rate=0.0)
# Each layer's own table (hierarchical bias) and one table broadcast to every layer (t5).
ATTENTIONS = {
    "hierarchical": dict(attention="hierarchical", position_encoding="none",
                         relative_bias="hierarchical"),
    "full": dict(attention="full", relative_bias="t5"),
}
# (attention, scan_layers, remat) against the plain loop: every policy and scanning at least
# once, the t5 table (broadcast to every layer) once; compiles dominate the time.
CASES = (("hierarchical", False, "full"), ("hierarchical", True, "none"),
         ("hierarchical", True, "save_matmuls"), ("full", True, "full"))
LENGTH = 17


def _tokens(batch: int, length: int) -> jnp.ndarray:
  return jax.random.randint(jax.random.PRNGKey(3), (batch, length), 1, BASE.vocab_size)


def _params(config: ModelConfig) -> dict:
  """Unscanned float32 parameters (PRNGKey(0)), stacked when config.scan_layers."""
  plain = dataclasses.replace(config, scan_layers=False, remat="none")
  params = nn.unbox(DecoderLM(plain).init(jax.random.PRNGKey(0), _tokens(1, 4)))["params"]
  return layer_stack.stack_layers(params, config.num_layers) if config.scan_layers else params


@functools.cache
def _baseline(attention: str, tokens_shape: tuple) -> tuple:
  base = dataclasses.replace(BASE, **ATTENTIONS[attention])
  return _loss_and_grads(base, _params(base), _tokens(*tokens_shape))


def _loss_and_grads(config: ModelConfig, params: dict, tokens: jnp.ndarray):
  """Mean next-token cross entropy over tokens [B, L] and its gradient (dropout key 1)."""
  model = DecoderLM(config)

  def loss(p):
    logits = model.apply({"params": p}, tokens[:, :-1], deterministic=False,
                         rngs={"dropout": jax.random.PRNGKey(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("attention,scan,remat", CASES)
def test_scan_and_remat_give_the_loop_s_loss_and_gradients(attention, scan, remat):
  config = dataclasses.replace(BASE, **ATTENTIONS[attention], scan_layers=scan, remat=remat)
  want_loss, want_grads = _baseline(attention, (2, LENGTH))
  loss, grads = _loss_and_grads(config, _params(config), _tokens(2, LENGTH))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_close(layer_stack.unstack_layers(grads) if scan else grads, want_grads)
  assert abs(float(want_loss) - np.log(BASE.vocab_size)) < 1.0  # a real loss, not zero


def test_remat_keeps_dropout_masks():
  base = dataclasses.replace(BASE, **ATTENTIONS["hierarchical"], dropout_rate=0.3)
  tokens = _tokens(2, LENGTH)
  want_loss, want_grads = _loss_and_grads(base, _params(base), tokens)
  remat = dataclasses.replace(base, remat="full")
  loss, grads = _loss_and_grads(remat, _params(remat), tokens)
  no_dropout, _ = _baseline("hierarchical", (2, LENGTH))
  assert float(want_loss) != pytest.approx(float(no_dropout), rel=1e-3)  # dropout acts
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_close(grads, want_grads)


def test_scanned_parameters_have_a_layer_axis_named_layers():
  config = dataclasses.replace(BASE, scan_layers=True)
  boxed = jax.eval_shape(DecoderLM(config).init, jax.random.PRNGKey(0), _tokens(1, 4))
  kernel = boxed["params"]["blocks"]["block"]["mlp"]["wi"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")
  assert kernel.value.shape == (2, 32, 64)
  assert not any(name.startswith("block_") for name in boxed["params"])


def test_scanned_decoding_matches_the_forward_pass():
  config = dataclasses.replace(BASE, **ATTENTIONS["hierarchical"], scan_layers=True)
  params, tokens = _params(config), _tokens(2, 9)
  model = DecoderLM(config, decode=True)
  first = jnp.zeros((2, 1), jnp.int32)
  cache = jax.tree.map(jnp.zeros_like,
                       model.init(jax.random.PRNGKey(0), first, positions=first)["cache"])

  def step(cache, t):
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    logits, updates = model.apply({"params": params, "cache": cache}, token,
                                  positions=jnp.full((2, 1), t), mutable=["cache"])
    return updates["cache"], logits[:, 0]

  _, steps = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(tokens.shape[1])))(cache)
  full = DecoderLM(config).apply({"params": params}, tokens)
  np.testing.assert_allclose(jnp.swapaxes(steps, 0, 1), full, rtol=1e-4, atol=1e-4)


def test_unknown_remat_policy_is_a_config_error():
  with pytest.raises(ConfigError, match=r"ModelConfig.remat='some' must be one of \('none'"):
    dataclasses.replace(BASE, remat="some")


@pytest.mark.parametrize("saved_scan", (False, True))
def test_checkpoint_of_the_other_layout_fails_with_one_line_saying_why(tmp_path, saved_scan):
  saved = _params(dataclasses.replace(BASE, scan_layers=saved_scan))
  items = {"params": saved}
  with checkpoints.Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(1, items, {"cursor": 0}, "cfg", force=True)
    ckpt.wait()
    ckpt.check_compatible(items)  # its own layout passes
    other = _params(dataclasses.replace(BASE, scan_layers=not saved_scan))
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
      ckpt.check_compatible({"params": other})
  message = str(raised.value)
  assert f"saved with ModelConfig.scan_layers={saved_scan}" in message
  assert f"set ModelConfig.scan_layers = {saved_scan} to read it" in message
  assert "\n" not in message
