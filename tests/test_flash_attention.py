"""ModelConfig.full_attention_kernel = "flash": the Pallas TPU kernel (run by Pallas's
interpreter on this CPU) gives the numbers of XLA's full attention, alone and in the model,
with and without a mesh; and its configuration errors name the binding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm1b import partitioning, flash_attention
from lm1b.errors import ConfigError
from lm1b.model import DecoderLM, ModelConfig

XLA = ModelConfig(vocab_size=64, num_layers=1, num_heads=2, d_model=64, d_ff=64, max_len=128,
                  attention="full", position_encoding="rotary", dtype="float32",
                  dropout_rate=0.0)
FLASH = dataclasses.replace(XLA, full_attention_kernel="flash")


def _packed(batch: int, length: int):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (batch, length), 1, XLA.vocab_size)
  # Two sentences in row 0 (cut at 50), one and padding (segment 0) in row 1.
  segments = np.ones((batch, length), np.int32)
  segments[0, 50:] = 2
  segments[1, 100:] = 0
  positions = np.concatenate([np.arange(50), np.arange(length - 50)])[None].repeat(batch, 0)
  return tokens, jnp.asarray(segments), jnp.asarray(positions)


def _loss_and_grads(config: ModelConfig, params, mesh=None):
  tokens, segments, positions = _packed(2, 128)
  model = DecoderLM(config)

  def loss(p):
    logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segments,
                         deterministic=True)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return (per_token * (segments[:, 1:] > 0)).sum()

  with flash_attention.interpret_off_tpu():
    if mesh is None:
      return jax.jit(jax.value_and_grad(loss))(params)
    return partitioning.MeshJit(jax.value_and_grad(loss), mesh)(params)


def test_kernel_alone_matches_dot_product_attention_with_segments():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 256, 2, 32)) for i in range(3))
  _, segments, _ = _packed(2, 256)
  mask = (segments[:, :, None] == segments[:, None, :])[:, None]
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  got = jax.jit(flash_attention.flash_attention)(q, k, v, segments)  # interpreted on CPU
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("with_mesh", [False, True])
def test_model_loss_and_gradients_equal_xla_attention(with_mesh):
  params = nn.unbox(DecoderLM(XLA).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)))
  mesh = partitioning.make_mesh(devices=jax.devices()[:1]) if with_mesh else None
  want_loss, want_grads = _loss_and_grads(XLA, params["params"])
  loss, grads = _loss_and_grads(FLASH, params["params"], mesh)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  tokens = jnp.ones((1, 128), jnp.int32)
  program = lambda config: str(jax.make_jaxpr(DecoderLM(config).apply)(params, tokens))
  with flash_attention.interpret_off_tpu():
    assert "pallas_call" in program(FLASH) and "pallas_call" not in program(XLA)
  # Outside it, a CPU program uses XLA's attention (a model trained on TPU with the kernel
  # evaluates at full speed here).
  assert "pallas_call" not in program(FLASH)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("changes,message", [
    (dict(attention="hierarchical"), "needs attention='full'"),
    (dict(relative_bias="t5"), "takes no relative bias"),
    (dict(full_attention_kernel="cudnn"), "must be one of ('xla', 'flash')"),
])
def test_configuration_errors_name_the_binding(changes, message):
  with pytest.raises(ConfigError, match="ModelConfig.full_attention_kernel"):
    dataclasses.replace(FLASH, **changes)
  with pytest.raises(ConfigError) as error:
    dataclasses.replace(FLASH, **changes)
  assert message in str(error.value)


def test_rows_not_a_multiple_of_128_are_refused():
  q = jnp.zeros((1, 96, 2, 32))
  with pytest.raises(ValueError, match="multiple of 128 positions, got 96"):
    flash_attention.flash_attention(q, q, q)
