"""Autoregressive sampling with the decode-mode model inside one lax loop.

Each loop step t feeds token t of every row (all rows in lock step) through
`DecoderLM(decode=True)`, which advances the attention caches (hattention
decoding cache for hierarchical models, a KV cache for full attention). Token
t + 1 is copied from the prompt while t + 1 < prompt_length, else drawn from
the filtered next-token distribution. Rows that emitted EOS are padded with
PAD; the loop stops once every row has finished or the buffer is full.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from lm1b import experiment
from lm1b import partitioning
from lm1b.errors import ConfigError
from lm1b.model import DecoderLM
from lm1b.model_config import ModelConfig
from lm1b.run_config import RunConfig
from lm1b.workdir import Workdir
from lm1b.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def filter_logits(logits, *, temperature, top_k: int, top_p):
  """Scaled and filtered logits; filtered-out entries are -inf.

  Args:
    logits: [batch, vocab] float32.
    temperature: positive scalar divisor.
    top_k: keep the k largest (0 keeps all); static.
    top_p: keep the smallest set of most likely tokens whose probability
      reaches top_p (1.0 keeps all); the most likely token is always kept.

  Returns:
    [batch, vocab] float32.
  """
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where((before < top_p) | (top_p >= 1.0), ordered, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def _next_token(logits, rng, temperature, top_k, top_p):
  """[batch, vocab] float32 logits -> [batch] int32 token (greedy if temperature 0)."""
  greedy = jnp.argmax(logits, axis=-1)
  safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
  filtered = filter_logits(logits, temperature=safe_temperature, top_k=top_k,
                           top_p=top_p)
  sampled = jax.random.categorical(rng, filtered, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _empty_cache(model: DecoderLM, batch: int):
  """Zero decode cache of `model` for `batch` rows (shapes via eval_shape)."""
  tokens = jnp.zeros((batch, 1), jnp.int32)
  shapes = jax.eval_shape(
      functools.partial(model.init, positions=tokens),
      jax.random.PRNGKey(0), tokens)["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit,
                   static_argnames=("config", "max_length", "top_k", "eos_id"))
def _generate(config, params, buffer, prompt_lengths, rng, temperature, top_p,
              *, max_length, top_k, eos_id):
  """Jitted loop; `buffer` is [batch, max_length] with the prompts, PAD after."""
  model = DecoderLM(config, decode=True)
  batch = buffer.shape[0]

  def step(state):
    t, tokens, cache, done = state
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    positions = jnp.full((batch, 1), t, jnp.int32)
    logits, updates = model.apply(
        {"params": params, "cache": cache}, token, positions=positions,
        mutable=["cache"])
    drawn = _next_token(logits[:, 0], jax.random.fold_in(rng, t), temperature,
                        top_k, top_p)
    in_prompt = t + 1 < prompt_lengths
    forced = jax.lax.dynamic_slice_in_dim(tokens, t + 1, 1, axis=1)[:, 0]
    new = jnp.where(in_prompt, forced, jnp.where(done, PAD_ID, drawn))
    done = done | (~in_prompt & (drawn == eos_id))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], t + 1,
                                                 axis=1)
    return t + 1, tokens, updates["cache"], done

  def running(state):
    t, _, _, done = state
    return (t < max_length - 1) & ~jnp.all(done)

  state = (jnp.int32(0), buffer, _empty_cache(model, batch),
           jnp.zeros((batch,), bool))
  return jax.lax.while_loop(running, step, state)[1]


def generate(model_config: ModelConfig, params, prompt_tokens, prompt_lengths,
             *, rng, max_length: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int = EOS_ID):
  """Continues prompts up to `max_length` tokens.

  Args:
    model_config: configuration of the trained model.
    params: its parameters (the "params" collection, boxed or not).
    prompt_tokens: [batch, P] int32, each row BOS + prompt ids, PAD after.
    prompt_lengths: [batch] int32 in 1..P, the real length of each row.
    rng: PRNG key; the result is a deterministic function of it.
    max_length: total tokens per row, P <= max_length <= model_config.max_len.
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: sample among the k most likely tokens (0 = no limit).
    top_p: nucleus sampling mass (1.0 = no limit).
    eos_id: a row stops after emitting this id.

  Returns:
    [batch, max_length] int32: the prompt, the continuation (ending with
    eos_id if emitted), PAD after.
  """
  prompt_tokens = np.asarray(prompt_tokens, np.int32)
  prompt_lengths = np.asarray(prompt_lengths, np.int32)
  batch, prompt_len = prompt_tokens.shape
  if not prompt_len <= max_length <= model_config.max_len:
    raise ValueError(f"max_length={max_length} must be in [prompt length "
                     f"{prompt_len}, model max_len {model_config.max_len}]")
  if prompt_lengths.shape != (batch,) or np.any(prompt_lengths < 1) or np.any(
      prompt_lengths > prompt_len):
    raise ValueError(f"prompt_lengths={prompt_lengths.tolist()} must be "
                     f"[{batch}] values in 1..{prompt_len}")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature={temperature}, top_k={top_k}, "
                     f"top_p={top_p}: need temperature >= 0, top_k >= 0, "
                     "0 < top_p <= 1")
  buffer = np.full((batch, max_length), PAD_ID, np.int32)
  columns = np.arange(prompt_len)[None, :] < prompt_lengths[:, None]
  buffer[:, :prompt_len] = np.where(columns, prompt_tokens, PAD_ID)
  return _generate(model_config, params, jnp.asarray(buffer),
                   jnp.asarray(prompt_lengths), rng, jnp.float32(temperature),
                   jnp.float32(top_p), max_length=max_length, top_k=int(top_k),
                   eos_id=int(eos_id))


def sample_text(model_config: ModelConfig, params, tokenizer, prompts, *,
                seed: int = 0, num_samples: int = 1, max_length: int = 64,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                ) -> list:
  """Generates `num_samples` continuations per prompt, all in one batch.

  Returns a list of len(prompts) * num_samples strings (prompt-major order),
  each the decoded prompt plus continuation up to its first EOS.
  """
  encoded = [[BOS_ID] + list(ids) for ids in tokenizer.encode_batch(prompts)
             for _ in range(num_samples)]
  lengths = np.array([len(ids) for ids in encoded], np.int32)
  tokens = np.full((len(encoded), lengths.max()), PAD_ID, np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)] = ids
  out = np.asarray(generate(
      model_config, params, tokens, lengths, rng=jax.random.PRNGKey(seed),
      max_length=max_length, temperature=temperature, top_k=top_k,
      top_p=top_p))
  texts = []
  for row, length in zip(out, lengths):
    stops = np.nonzero(row[length:] == EOS_ID)[0]
    end = length + stops[0] if stops.size else len(row)
    texts.append(tokenizer.decode(row[:end].tolist()))
  return texts


def sample_workdir(config: RunConfig, workdir: Workdir, prompts: list[str], *,
                   step: int | None = None, max_length: int | None = None,
                   accept_mismatch: bool = False, **options) -> tuple[int, list[str]]:
  """(checkpoint step, texts): `sample_text` with a workdir's tokenizer and parameters.

  config: the workdir's configuration (config.gin, lm1b.cli reads it). Only the parameters
  are restored; no data is read. max_length defaults to the model's max_len; options go to
  `sample_text`.
  """
  loaded = experiment.load_trained(workdir, config.model, config.mesh(), step=step,
                                   accept_mismatch=accept_mismatch)
  _check_fits(loaded, prompts, max_length, options.get("top_k", 0))
  with partitioning.mesh_context(loaded.mesh):
    texts = sample_text(loaded.model_config, loaded.params, loaded.tokenizer, prompts,
                        max_length=max_length or loaded.model_config.max_len, **options)
  return loaded.step, texts


def _check_fits(loaded: experiment.TrainedModel, prompts: list[str], max_length: int | None,
                top_k: int) -> None:
  """ConfigError when --top_k exceeds the vocabulary, --max_length the model's max_len, or a
  prompt (with BOS) the length to generate; the message names the flag the user gave (or
  the default). Prompts with characters the tokenizer does not know are warned about."""
  limit = loaded.model_config.max_len
  if top_k > loaded.model_config.vocab_size:
    raise ConfigError(f"--top_k {top_k} exceeds the vocabulary of "
                      f"{loaded.model_config.vocab_size} pieces")
  if max_length is not None and max_length > limit:
    raise ConfigError(f"--max_length {max_length} exceeds the model's max_len {limit}")
  length = max_length or limit
  encoded = loaded.tokenizer.encode_batch(prompts)
  unknown = [prompt for prompt, ids in zip(prompts, encoded) if UNK_ID in ids]
  if unknown:
    logging.warning("prompt(s) %s hold characters the tokenizer does not know; they are "
                    "read as <unk> and print as \u2047", ", ".join(map(repr, unknown)))
  for prompt, ids in zip(prompts, encoded):
    if len(ids) + 1 > length:
      named = (f"--max_length {max_length}" if max_length else
               f"the model's max_len {limit} (the default of --max_length)")
      raise ConfigError(f"--prompt {prompt[:40]!r} is {len(ids) + 1} tokens with BOS, longer "
                        f"than {named}")
