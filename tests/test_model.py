"""Tests for lm1b.model: shapes, causality, attention cross-checks, decoding, sizes."""

import dataclasses
import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from hattention import packing_slot
from lm1b.model import DecoderLM, ModelConfig, count_params

TINY = ModelConfig(vocab_size=64, num_layers=2, num_heads=2, d_model=32,
                   d_ff=64, max_len=32, dropout_rate=0.0, block_size=4,
                   dtype="float32")
KINDS = {
    "hierarchical-sample": dict(attention="hierarchical", query_mode="sample"),
    "hierarchical-fine": dict(attention="hierarchical", query_mode="fine"),
    "full": dict(attention="full"),
}


def _config(kind: str, **overrides) -> ModelConfig:
  return dataclasses.replace(TINY, **{**KINDS[kind], **overrides})


@pytest.fixture(scope="module")
def params():
  """Float32 parameters shared by every attention kind (same tree)."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(DecoderLM(_config("full")).init)
  return nn.unbox(init(jax.random.PRNGKey(0), tokens))["params"]


@pytest.fixture(scope="module")
def rotary_params():
  """Parameters of the rotary models (no position table)."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(DecoderLM(_config("full", position_encoding="rotary")).init)
  return nn.unbox(init(jax.random.PRNGKey(0), tokens))["params"]


def _tokens(batch: int, length: int, seed: int = 1) -> jnp.ndarray:
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 3, 64)


@functools.partial(jax.jit, static_argnames=("config", "deterministic"))
def _logits(config, params, tokens, positions=None, segment_ids=None,
            deterministic=True, rngs=None):
  return DecoderLM(config).apply(
      {"params": params}, tokens, positions=positions, segment_ids=segment_ids,
      deterministic=deterministic, rngs=rngs)


@pytest.mark.parametrize("kind", ["hierarchical-sample", "full"])
def test_forward_shapes_dtypes_and_causality(params, kind):
  config = _config(kind)
  tokens = _tokens(2, 13)
  logits = _logits(config, params, tokens)
  assert logits.shape == (2, 13, 64) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  changed = _logits(config, params, tokens.at[:, 9].set(5))
  np.testing.assert_array_equal(logits[:, :9], changed[:, :9])
  assert not np.allclose(logits[:, 9:], changed[:, 9:])


def test_bfloat16_compute_gives_float32_logits_and_float32_params(params):
  config = _config("hierarchical-sample", dtype="bfloat16")
  shapes = jax.eval_shape(DecoderLM(config).init, jax.random.PRNGKey(0),
                          _tokens(1, 5))
  leaves = jax.tree_util.tree_leaves(nn.unbox(shapes))
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  tokens = _tokens(2, 13)
  logits = _logits(config, params, tokens)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  reference = _logits(_config("hierarchical-sample"), params, tokens)
  np.testing.assert_allclose(logits, reference, atol=0.1)


@pytest.mark.parametrize("query_mode", ["sample", "fine"])
def test_hierarchical_equals_full_attention_within_two_blocks(params,
                                                               query_mode):
  tokens = _tokens(2, 2 * TINY.block_size)
  hierarchical = _logits(_config("hierarchical-sample", query_mode=query_mode),
                         params, tokens)
  full = _logits(_config("full"), params, tokens)
  np.testing.assert_allclose(hierarchical, full, atol=1e-5, rtol=1e-5)


def test_hierarchical_differs_from_full_beyond_two_blocks(params):
  tokens = _tokens(1, 6 * TINY.block_size)
  hierarchical = _logits(_config("hierarchical-sample"), params, tokens)
  full = _logits(_config("full"), params, tokens)
  assert not np.allclose(hierarchical, full, atol=1e-4)


def test_packed_full_attention_isolates_segments(params):
  config = _config("full")
  first, second = _tokens(1, 5, seed=2), _tokens(1, 6, seed=3)
  packed = jnp.concatenate([first, second, jnp.zeros((1, 1), jnp.int32)], 1)
  segment_ids = jnp.array([[1] * 5 + [2] * 6 + [0]])
  positions = jnp.array([list(range(5)) + list(range(6)) + [0]])
  logits = _logits(config, params, packed, positions=positions,
                   segment_ids=segment_ids)
  np.testing.assert_allclose(logits[:, 5:11], _logits(config, params, second),
                             atol=1e-5)
  np.testing.assert_allclose(logits[:, :5], _logits(config, params, first),
                             atol=1e-5)


def test_hierarchical_segment_ids_mask_padding_keys(params):
  config = _config("hierarchical-sample")
  tokens = _tokens(1, 9)
  segment_ids = jnp.array([[1] * 9])
  np.testing.assert_allclose(
      _logits(config, params, tokens, segment_ids=segment_ids),
      _logits(config, params, tokens), atol=1e-6)


def _packed_row(sentences, block_size, row):
  """Sentences laid out with packing_slot: (tokens, positions, segment_ids) [1, row] and the
  offset of each sentence."""
  tokens, positions, segment_ids = (np.zeros(row, np.int32) for _ in range(3))
  offsets, cursor = [], 0
  for i, sentence in enumerate(sentences):
    n = sentence.shape[1]
    slot = packing_slot(n, block_size)
    offset = slot.first_offset(cursor)
    tokens[offset:offset + n], positions[offset:offset + n] = sentence[0], np.arange(n)
    segment_ids[offset:offset + n] = i + 1
    offsets.append(offset)
    cursor = offset + slot.span
  assert cursor <= row
  return tuple(jnp.asarray(x)[None] for x in (tokens, positions, segment_ids)), offsets


@pytest.mark.parametrize("kind,positions", [("hierarchical-sample", "learned"),
                                             ("hierarchical-fine", "learned"),
                                             ("hierarchical-sample", "rotary")])
def test_packed_hierarchical_sentence_gets_its_logits_alone(request, kind, positions):
  """Sentences of 9, 3, 6 and 11 tokens at offsets 0, 10, 13, 20 of a 32-position row (block
  4): each gets the logits it gets alone, and changing one leaves the others' unchanged."""
  config = _config(kind, position_encoding=positions)
  params = request.getfixturevalue("params" if positions == "learned" else "rotary_params")
  sentences = [_tokens(1, n, seed=n) for n in (9, 3, 6, 11)]
  (tokens, positions, segment_ids), offsets = _packed_row(sentences, TINY.block_size, 32)
  assert offsets == [0, 10, 13, 20]
  logits = _logits(config, params, tokens, positions=positions, segment_ids=segment_ids)
  for sentence, offset in zip(sentences, offsets):
    n = sentence.shape[1]
    np.testing.assert_allclose(logits[:, offset:offset + n],
                               _logits(config, params, sentence), atol=1e-5)
  changed = _logits(config, params, jnp.where(segment_ids == 2, 7, tokens),
                    positions=positions, segment_ids=segment_ids)
  others = np.asarray((segment_ids != 2)[0])
  np.testing.assert_array_equal(changed[0, others], logits[0, others])
  assert not np.allclose(changed[0, ~others], logits[0, ~others])


def _decode_all(config, params, tokens):
  """Logits [batch, length, vocab] from feeding tokens one by one in decode mode."""
  model = DecoderLM(config, decode=True)
  batch, length = tokens.shape
  first = jnp.zeros((batch, 1), jnp.int32)
  cache = model.init(jax.random.PRNGKey(0), first, positions=first)["cache"]
  cache = jax.tree_util.tree_map(jnp.zeros_like, cache)

  def step(cache, t):
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    logits, updates = model.apply(
        {"params": params, "cache": cache}, token,
        positions=jnp.full((batch, 1), t), mutable=["cache"])
    return updates["cache"], logits[:, 0]

  _, logits = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(length)))(
      cache)
  return jnp.swapaxes(logits, 0, 1)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decode_steps_match_full_forward(params, kind):
  config = _config(kind)
  tokens = _tokens(2, 21)
  np.testing.assert_allclose(_decode_all(config, params, tokens),
                             _logits(config, params, tokens),
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rotary_decode_steps_match_full_forward(rotary_params, kind):
  config = _config(kind, position_encoding="rotary")
  tokens = _tokens(2, 21)
  np.testing.assert_allclose(_decode_all(config, rotary_params, tokens),
                             _logits(config, rotary_params, tokens),
                             atol=1e-4, rtol=1e-4)


def test_rotary_has_no_position_table_and_sees_relative_positions_only(params, rotary_params):
  """Shifting every position leaves full attention's logits unchanged with rotary positions
  (and changes them with the learned table), spreading them apart changes them; the rotary
  tree is the learned one without the table."""
  assert "position_embed" not in rotary_params
  assert count_params(dataclasses.replace(TINY, position_encoding="rotary")) == (
      count_params(TINY) - TINY.max_len * TINY.d_model)
  tokens = _tokens(2, 13)
  base, shifted = jnp.arange(13)[None], jnp.arange(13)[None] + 17
  config = _config("full", position_encoding="rotary")
  np.testing.assert_allclose(_logits(config, rotary_params, tokens, positions=base),
                             _logits(config, rotary_params, tokens, positions=shifted),
                             atol=1e-4)
  spread = _logits(config, rotary_params, tokens, positions=3 * base)
  assert not np.allclose(_logits(config, rotary_params, tokens, positions=base)[:, 1:],
                         spread[:, 1:], atol=1e-3)
  learned = _config("full")
  assert not np.allclose(_logits(learned, params, tokens, positions=base),
                         _logits(learned, params, tokens, positions=shifted), atol=1e-3)


def test_decode_requires_positions_and_single_token(params):
  model = DecoderLM(_config("full"), decode=True)
  with pytest.raises(ValueError, match="positions are required"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  tokens = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="length 2"):
    model.init(jax.random.PRNGKey(0), tokens, positions=tokens)


def test_dropout_only_when_not_deterministic(params):
  config = _config("full", dropout_rate=0.5)
  tokens = _tokens(1, 6)
  eval_logits = _logits(config, params, tokens)
  np.testing.assert_allclose(eval_logits,
                             _logits(_config("full"), params, tokens))
  train_logits = _logits(config, params, tokens, deterministic=False,
                         rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(eval_logits, train_logits)


@pytest.mark.parametrize("d_model,d_ff,heads,target", [
    (512, 2048, 8, 53e6), (1024, 4096, 16, 144e6)])
def test_paper_sizes_within_two_percent(d_model, d_ff, heads, target):
  config = ModelConfig(vocab_size=32768, num_layers=6, num_heads=heads,
                       d_model=d_model, d_ff=d_ff, max_len=512)
  count = count_params(config)
  assert abs(count / target - 1) < 0.02, count


def test_count_params_matches_initialised_tree_and_tying(params):
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert count_params(TINY) == count
  tied = dataclasses.replace(TINY, tie_embeddings=True)
  assert count_params(tied) == count - 32 * 64 - 64


def test_parameters_carry_logical_axis_names():
  boxed = jax.eval_shape(DecoderLM(TINY).init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 4), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  block = specs["block_0"]
  assert specs["token_embed"]["embedding"] == PartitionSpec("vocab", "embed")
  assert specs["output"]["kernel"] == PartitionSpec("embed", "vocab")
  assert block["attention"]["query"]["kernel"] == PartitionSpec(
      "embed", "heads", "kv")
  assert block["attention"]["out"]["kernel"] == PartitionSpec(
      "heads", "kv", "embed")
  assert block["mlp"]["wi"]["kernel"] == PartitionSpec("embed", "mlp")
  assert block["mlp"]["wo"]["kernel"] == PartitionSpec("mlp", "embed")
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


@pytest.mark.parametrize("field,overrides", [
    ("d_model", dict(d_model=31)),
    ("attention", dict(attention="linear")),
    ("query_mode", dict(query_mode="coarse")),
    ("vocab_size", dict(vocab_size=0)),
    ("dtype", dict(dtype="float33")),
    ("position_encoding", dict(position_encoding="alibi")),
    ("head_dim", dict(position_encoding="rotary", d_model=30, num_heads=2)),
])
def test_config_validation_names_field(field, overrides):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(TINY, **overrides)


def test_model_config_is_gin_configurable():
  gin.clear_config()
  try:
    gin.parse_config("ModelConfig.num_layers = 3\n"
                     "ModelConfig.attention = 'full'")
    config = ModelConfig()
    assert (config.num_layers, config.attention) == (3, "full")
    assert hash(config) == hash(dataclasses.replace(config))
  finally:
    gin.clear_config()
