"""Tests for lm1b.model: shapes, causality, attention cross-checks, decoding, sizes."""

import dataclasses
import functools
import math

import flax.linen as nn
from flax import traverse_util
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from hattention import packing_slot
from lm1b import run_config, t5_bias
from lm1b.model import DecoderLM, count_params
from lm1b.model_config import ModelConfig

TINY = ModelConfig(vocab_size=64, num_layers=2, num_heads=2, d_model=32,
                   d_ff=64, max_len=32, dropout_rate=0.0, block_size=4,
                   dtype="float32")
KINDS = {
    "hierarchical-sample": dict(attention="hierarchical", query_mode="sample"),
    "hierarchical-fine": dict(attention="hierarchical", query_mode="fine"),
    "full": dict(attention="full"),
}


# Position signals (ModelConfig fields), each tested with the attention kinds it is for.
SIGNALS = {
    "learned": dict(position_encoding="learned"),
    "rotary": dict(position_encoding="rotary"),
    "none": dict(position_encoding="none"),
    "hierarchical": dict(position_encoding="none", relative_bias="hierarchical"),
    "rotary+hierarchical": dict(position_encoding="rotary", relative_bias="hierarchical"),
    "hierarchical-per-level-discount": dict(
        position_encoding="none", relative_bias="hierarchical", relative_bias_per_level=True,
        relative_bias_level_discount=True),
    "hierarchical-shared-heads": dict(position_encoding="none", relative_bias="hierarchical",
                                      relative_bias_shared_heads=True),
    "t5": dict(position_encoding="none", relative_bias="t5"),
    "rotary+t5": dict(position_encoding="rotary", relative_bias="t5"),
    "t5-shared-heads": dict(position_encoding="none", relative_bias="t5",
                            relative_bias_shared_heads=True),
}


def _config(kind: str, signal: str = "learned", **overrides) -> ModelConfig:
  return dataclasses.replace(TINY, **{**KINDS[kind], **SIGNALS[signal], **overrides})


@functools.cache
def _params(config: ModelConfig):
  """Float32 parameters of DecoderLM(config), initialised with PRNGKey(0)."""
  init = jax.jit(DecoderLM(config).init)
  return nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]


@pytest.fixture(scope="module")
def params():
  """Float32 parameters shared by every attention kind (same tree)."""
  return _params(_config("full"))


@pytest.fixture(scope="module")
def rotary_params():
  """Parameters of the rotary models (no position table)."""
  return _params(_config("full", "rotary"))


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


@pytest.mark.parametrize("signal", ["learned", "t5", "rotary+t5"])
def test_packed_full_attention_isolates_segments(signal):
  config = _config("full", signal)
  params = _params(config)
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


@pytest.mark.parametrize("kind,signal", [
    ("hierarchical-sample", "learned"), ("hierarchical-fine", "learned"),
    ("hierarchical-sample", "rotary"), ("hierarchical-sample", "hierarchical"),
    ("hierarchical-fine", "hierarchical"),
    ("hierarchical-sample", "hierarchical-per-level-discount")])
def test_packed_hierarchical_sentence_gets_its_logits_alone(kind, signal):
  """Sentences of 9, 3, 6 and 11 tokens at offsets 0, 10, 13, 20 of a 32-position row (block
  4): each gets the logits it gets alone, and changing one leaves the others' unchanged."""
  config = _config(kind, signal)
  params = _params(config)
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


DECODE_CASES = (
    [(kind, signal) for kind in sorted(KINDS) for signal in ("learned", "rotary")]
    + [("hierarchical-sample", "hierarchical"),
       ("hierarchical-fine", "hierarchical"), ("hierarchical-sample", "rotary+hierarchical"),
       ("hierarchical-sample", "hierarchical-per-level-discount"),
       ("hierarchical-fine", "hierarchical-shared-heads"),
       ("full", "t5"), ("full", "rotary+t5"), ("full", "t5-shared-heads")])


@pytest.mark.parametrize("kind,signal", DECODE_CASES)
def test_decode_steps_match_full_forward(kind, signal):
  config = _config(kind, signal)
  params = _params(config)
  tokens = _tokens(2, 21)
  np.testing.assert_allclose(_decode_all(config, params, tokens),
                             _logits(config, params, tokens),
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


def test_t5_buckets_by_hand():
  """32 buckets, max distance 128: distances 0-15 exact; from 16 on, bucket
  16 + floor(16 * log(n / 16) / log(8)) (e.g. 19: 16 * 0.1719 / 2.0794 = 1.32 -> 17; 100:
  16 * 1.8326 / 2.0794 = 14.1 -> 30), capped at 31; future keys (n < 0) read bucket 0."""
  distances = list(range(21)) + [31, 32, 63, 64, 100, 127, 128, 1000, -1, -7]
  expected = (list(range(16)) + [16, 16, 16, 17, 17] + [21, 21, 26, 26, 30, 31, 31, 31, 0, 0])
  assert t5_bias.bucket(jnp.array(distances)).tolist() == expected
  table = jnp.arange(32.0)[:, None] * jnp.array([[1.0, -1.0]])  # entry = +-bucket per head
  bias = t5_bias.bias(table, jnp.array([[40]]), jnp.arange(41))
  assert bias.shape == (1, 2, 1, 41) and bias.dtype == jnp.float32
  np.testing.assert_array_equal(bias[0, 1, 0], -t5_bias.bucket(40 - jnp.arange(41)))


def _map_bias(params, fn):
  """params with fn(table) in place of every relative_bias table (dropped where None)."""
  flat = traverse_util.flatten_dict(params)
  mapped = {path: fn(x) if path[-1] == "relative_bias" else x for path, x in flat.items()}
  return traverse_util.unflatten_dict({k: v for k, v in mapped.items() if v is not None})


@pytest.mark.parametrize("kind,signal", [("full", "t5"), ("hierarchical-sample", "hierarchical")])
def test_relative_bias_is_a_position_signal_by_relative_position(kind, signal):
  """One layer, no position encoding, 8 tokens (block 4: all of position 7's keys at level 0).
  Without a bias, position 7 sees its prefix as a set: swapping tokens 2 and 5 leaves its
  logits unchanged; with the bias they change; a zero table gives the model without bias."""
  config = _config(kind, signal, num_layers=1)
  bare_config = _config(kind, "none", num_layers=1)
  params = _params(config)
  bare = _map_bias(params, lambda table: None)
  assert jax.tree.structure(bare) == jax.tree.structure(_params(bare_config))
  tokens = _tokens(1, 8)
  swapped = tokens.at[0, jnp.array([2, 5])].set(tokens[0, jnp.array([5, 2])])
  last = lambda cfg, p, t: _logits(cfg, p, t)[0, -1]
  np.testing.assert_allclose(last(bare_config, bare, tokens), last(bare_config, bare, swapped),
                             atol=1e-5)
  assert not np.allclose(last(config, params, tokens), last(config, params, swapped),
                         atol=1e-3)
  np.testing.assert_allclose(last(config, _map_bias(params, jnp.zeros_like), tokens),
                             last(bare_config, bare, tokens), atol=1e-5)


@pytest.mark.parametrize("kind,signal", [
    ("full", "t5-shared-heads"), ("hierarchical-sample", "hierarchical-per-level-discount")])
def test_gradient_reaches_the_bias_tables_at_the_distances_and_levels_seen(kind, signal):
  """The loss of a 32-token row (block 4: levels 0-2) has a gradient on every table, every level
  of a per-level table, and on the T5 table's buckets of distances 0..31 (0..21) only."""
  config = _config(kind, signal)
  params, tokens = _params(config), _tokens(1, 33)

  def loss(p):
    log_probs = jax.nn.log_softmax(_logits(config, p, tokens[:, :-1]))
    return -jnp.sum(jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1))

  grads = traverse_util.flatten_dict(jax.grad(loss)(params))
  tables = {path: g for path, g in grads.items() if path[-1] == "relative_bias"}
  assert len(tables) == (1 if kind == "full" else TINY.num_layers)
  for table in tables.values():
    touched = np.any(np.asarray(table) != 0, axis=tuple(range(1, table.ndim)))
    if kind == "full":
      assert touched.tolist() == [True] * 22 + [False] * 10
    else:
      assert touched.tolist() == [True] * 3


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


@pytest.mark.parametrize("kind,signal,shape,names", [
    ("full", "none", None, None),
    ("full", "t5", (32, 2), (None, "heads")),
    ("full", "t5-shared-heads", (32, 1), (None, None)),
    ("hierarchical-sample", "hierarchical", (15, 2), (None, "heads")),
    ("hierarchical-sample", "hierarchical-shared-heads", (15, 1), (None, None)),
    ("hierarchical-sample", "hierarchical-per-level-discount", (3, 15, 2),
     (None, None, "heads"))])
def test_relative_bias_tables_shapes_names_and_count(kind, signal, shape, names):
  """T5: one table [32 buckets, heads|1] for the model; hierarchical: one per layer [4 * 4 - 1,
  heads|1], or [3 levels, ...] per level (max_len 32, block 4); no position table."""
  config = _config(kind, signal)
  boxed = jax.eval_shape(DecoderLM(config).init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 4), jnp.int32))["params"]
  flat = traverse_util.flatten_dict(boxed)
  tables = {path: box for path, box in flat.items() if path[-1] == "relative_bias"}
  assert "position_embed" not in boxed
  no_positions = count_params(TINY) - TINY.max_len * TINY.d_model
  if shape is None:
    assert not tables and count_params(config) == no_positions
    return
  layers = 1 if kind == "full" else TINY.num_layers
  assert len(tables) == layers and count_params(config) == no_positions + layers * math.prod(shape)
  for box in tables.values():
    assert box.value.shape == shape and box.value.dtype == jnp.float32 and box.names == names


def test_level_discount_starts_level_l_at_minus_l_log_2():
  table = _params(_config("hierarchical-sample", "hierarchical-per-level-discount"))[
      "block_0"]["attention"]["relative_bias"]
  np.testing.assert_allclose(table.mean(axis=(1, 2)), -math.log(2) * np.arange(3), atol=0.06)
  np.testing.assert_allclose(table.std(axis=(1, 2)), 0.1, rtol=0.35)


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
    ("relative_bias", dict(relative_bias="alibi")),
    ("relative_bias", dict(attention="full", relative_bias="hierarchical")),
    ("relative_bias", dict(attention="hierarchical", relative_bias="t5")),
    ("relative_bias_shared_heads", dict(relative_bias_shared_heads=True)),
    ("relative_bias_per_level", dict(attention="full", relative_bias="t5",
                                     relative_bias_per_level=True)),
    ("relative_bias_level_discount", dict(relative_bias="hierarchical",
                                          relative_bias_level_discount=True)),
    ("head_dim", dict(position_encoding="rotary", d_model=30, num_heads=2)),
])
def test_config_validation_names_field(field, overrides):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(TINY, **overrides)


def test_model_config_is_gin_configurable():
  gin.clear_config()
  try:
    gin.parse_config("ModelConfig.num_layers = 3\n"
                     "ModelConfig.attention = 'full'\n"
                     "train_and_evaluate.num_steps = 1")
    config = run_config.build().model
    assert (config.num_layers, config.attention) == (3, "full")
    assert config == dataclasses.replace(ModelConfig(), num_layers=3, attention="full")
    assert hash(config) == hash(dataclasses.replace(config))
  finally:
    gin.clear_config()
