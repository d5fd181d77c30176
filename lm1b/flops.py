"""Model FLOPs per token and peak FLOP/s, for model-FLOPs utilisation (MFU).

Conventions (training = forward + backward = 3x the forward matmul FLOPs; one multiply-add
is 2 FLOPs; non-matmul work such as softmax, LayerNorm and key averaging is not counted):

* Dense layers: 6 FLOPs per matmul parameter per token. Per layer the matmul parameters are
  4 * d_model^2 (query, key, value, output projections; num_heads * head_dim = d_model) and
  2 * d_model * d_ff (FFN), plus d_model * vocab_size for the output layer. The embedding
  lookup is a gather and is not counted.
* Attention: per query and per key (or coarse key cell) it sees, q.k costs 2 * d_model and
  p.v another 2 * d_model, so training costs 12 * d_model per query-key pair and layer.
  - full: every query is charged all seq_len keys, i.e. the whole L x L product the dense
    kernel computes, with no halving for the causal mask (the masked half is still
    computed). This is the PaLM-paper accounting.
  - hierarchical (see hattention.reference for the rule, block size b): the sequence is
    padded to T = b * 2**M and has M levels (or num_levels). At level 0 a query block sees its
    own block and its neighbours: 2b keys causal (left + self), 3b bidirectional. At level
    l >= 1 the keys are averaged over cells of 2**l positions, and a block of b such cells
    attends to its neighbouring blocks of b cells: b cells causal (left), 2b bidirectional.
    query_mode "fine" computes this for every position; "sample" and "mean" compute it once
    per cell of 2**l queries, so level l costs 1 / 2**l of that per position. The boundary
    blocks are charged as if their neighbours existed (they are computed, zero-padded).
    Costs are computed on the padded length and divided by seq_len real tokens.
"""

import functools
import math
import time

import jax
import jax.numpy as jnp

from hattention import QUERY_MODES, level_count, padded_length

ATTENTIONS = ("full", "hierarchical")

# Dense peak FLOP/s per chip (per GPU) by jax `device_kind`, for bfloat16 and float32 matmuls.
# float32 is None where XLA runs f32 matmuls as multi-pass bf16 (TPU): no meaningful peak.
# GPU float32 is the non-tensor-core FP32 figure (XLA's default f32 precision on GPU may
# use TF32 instead, which makes the f32 MFU pessimistic by design).
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "TPU v2": {"bfloat16": 45e12, "float32": None},
    "TPU v3": {"bfloat16": 123e12, "float32": None},
    "TPU v4": {"bfloat16": 275e12, "float32": None},
    "TPU v4 lite": {"bfloat16": 137.5e12, "float32": None},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": None},
    "TPU v5e": {"bfloat16": 197e12, "float32": None},
    "TPU v5": {"bfloat16": 459e12, "float32": None},
    "TPU v5p": {"bfloat16": 459e12, "float32": None},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": None},
    "TPU v6e": {"bfloat16": 918e12, "float32": None},
    "TPU7x": {"bfloat16": 2307e12, "float32": None},
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
}


def matmul_params_per_token(*, num_layers: int, d_model: int, d_ff: int,
                            vocab_size: int) -> int:
  """Weights each token multiplies with in one forward pass (embedding lookup excluded)."""
  return num_layers * (4 * d_model * d_model + 2 * d_model * d_ff) + d_model * vocab_size


def attention_keys_per_query(*, seq_len: int, attention: str = "hierarchical",
                             block_size: int = 16, query_mode: str = "sample",
                             num_levels: int | None = None, causal: bool = True) -> float:
  """Average number of (fine or coarse) keys a query is charged for in one layer."""
  if attention == "full":
    return float(seq_len)
  if attention != "hierarchical":
    raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
  if query_mode not in QUERY_MODES:
    raise ValueError(f"unknown query_mode {query_mode!r}; expected one of {QUERY_MODES}")
  padded = padded_length(seq_len, block_size)
  levels = level_count(seq_len, block_size, num_levels)
  keys = (2 if causal else 3) * block_size
  for level in range(1, levels):
    coarse = (1 if causal else 2) * block_size
    keys += coarse if query_mode == "fine" else coarse / 2**level
  return keys * padded / seq_len


def model_flops_per_token(*, num_layers: int, d_model: int, d_ff: int, vocab_size: int,
                          seq_len: int, attention: str = "hierarchical",
                          block_size: int = 16, query_mode: str = "sample",
                          num_heads: int = 8, num_levels: int | None = None,
                          causal: bool = True) -> float:
  """Training FLOPs per token: 6 * matmul params + 12 * layers * d_model * keys per query.

  num_heads only has to divide d_model (the cost does not depend on the head split).
  """
  if d_model % num_heads:
    raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
  dense = 6 * matmul_params_per_token(num_layers=num_layers, d_model=d_model, d_ff=d_ff,
                                      vocab_size=vocab_size)
  keys = attention_keys_per_query(seq_len=seq_len, attention=attention,
                                  block_size=block_size, query_mode=query_mode,
                                  num_levels=num_levels, causal=causal)
  return float(dense + 12 * num_layers * d_model * keys)


def flops_per_token_for_config(config, seq_len: int) -> float:
  """model_flops_per_token for an lm1b.model.ModelConfig-like object (attribute access)."""
  return model_flops_per_token(
      num_layers=config.num_layers, d_model=config.d_model, d_ff=config.d_ff,
      vocab_size=config.vocab_size, seq_len=seq_len, attention=config.attention,
      block_size=config.block_size, query_mode=config.query_mode,
      num_heads=config.num_heads, num_levels=getattr(config, "num_levels", None))


def peak_flops(device_kind: str, dtype=jnp.bfloat16) -> float | None:
  """Peak dense FLOP/s of one device of `device_kind` for `dtype`, None when unknown.

  Exact table keys first, then the longest key that prefixes device_kind (so
  'NVIDIA H100 80GB HBM3' matches 'NVIDIA H100', 'NVIDIA A100-SXM4-40GB' 'NVIDIA A100').
  """
  name = jnp.dtype(dtype).name
  entry = PEAK_FLOPS.get(device_kind)
  if entry is None:
    prefixes = [key for key in PEAK_FLOPS if device_kind.startswith(key)]
    entry = PEAK_FLOPS[max(prefixes, key=len)] if prefixes else None
  return None if entry is None else entry.get(name)


@functools.partial(jax.jit, static_argnums=1)
def _chained_matmuls(a, repeats: int):
  def body(_, x):
    return (x @ a) * 0.5
  return jax.lax.fori_loop(0, repeats, body, a)


def measure_cpu_matmul_peak(dtype=jnp.float32, size: int = 1024, seconds: float = 1.0,
                            repeats: int = 4) -> float:
  """Achievable matmul FLOP/s of this host's CPU backend (best timing over ~`seconds`).

  Runs a jitted loop of `repeats` [size, size] matmuls on jax.devices('cpu')[0]; XLA uses all
  the host's cores for it, so this is a per-process figure.
  """
  device = jax.devices("cpu")[0]
  a = jax.device_put(jnp.eye(size, dtype=dtype) * 1.5, device)
  _chained_matmuls(a, repeats).block_until_ready()  # compile + warm up
  best, deadline = math.inf, time.perf_counter() + seconds
  while True:
    start = time.perf_counter()
    _chained_matmuls(a, repeats).block_until_ready()
    best = min(best, time.perf_counter() - start)
    if time.perf_counter() >= deadline:
      break
  return 2.0 * size**3 * repeats / best


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float:
  """Model FLOPs utilisation = tokens/s * FLOPs/token / peak FLOP/s (nan without a peak)."""
  if not peak or peak <= 0:
    return math.nan
  return tokens_per_sec * flops_per_token / peak
