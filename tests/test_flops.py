"""Tests for lm1b.flops: FLOPs per token, peak table lookup, CPU peak measurement, MFU."""

import math
import types

import jax.numpy as jnp
import pytest

from lm1b import flops

SIZES = dict(num_layers=6, d_model=512, d_ff=2048, vocab_size=32000, num_heads=8)


def test_full_attention_formula():
  total = flops.model_flops_per_token(**SIZES, seq_len=2048, attention="full")
  params = 6 * (4 * 512**2 + 2 * 512 * 2048) + 512 * 32000
  assert total == 6 * params + 12 * 6 * 2048 * 512


def test_hierarchical_attention_is_linear_and_much_cheaper():
  dense = 6 * flops.matmul_params_per_token(num_layers=6, d_model=512, d_ff=2048,
                                            vocab_size=32000)

  def attention_term(seq_len, **kwargs):
    return flops.model_flops_per_token(**SIZES, seq_len=seq_len, **kwargs) - dense

  full = attention_term(2048, attention="full")
  sample = attention_term(2048, attention="hierarchical", block_size=16, query_mode="sample")
  fine = attention_term(2048, attention="hierarchical", block_size=16, query_mode="fine")
  assert sample < fine < full / 10
  assert sample < full / 40
  # level 0: 2b keys; levels 1..6: b / 2**l coarse cells each (causal, sample mode).
  expected_keys = 32 + sum(16 / 2**level for level in range(1, 7))
  assert sample == pytest.approx(12 * 6 * 512 * expected_keys)
  assert fine == pytest.approx(12 * 6 * 512 * (32 + 6 * 16))
  # Sample mode per-token attention cost barely grows with length; full grows linearly.
  assert attention_term(8192, attention="hierarchical") < 1.1 * sample
  assert attention_term(8192, attention="full") == pytest.approx(4 * full)
  local = attention_term(2048, attention="hierarchical", num_levels=1)
  assert local == pytest.approx(12 * 6 * 512 * 32)
  bidirectional = flops.attention_keys_per_query(seq_len=2048, causal=False, query_mode="fine")
  assert bidirectional == 48 + 6 * 32


def test_config_wrapper_and_errors():
  config = types.SimpleNamespace(**SIZES, attention="hierarchical", block_size=16,
                                 query_mode="sample", num_levels=None)
  assert flops.flops_per_token_for_config(config, 512) == flops.model_flops_per_token(
      **SIZES, seq_len=512)
  with pytest.raises(ValueError, match="'sparse'"):
    flops.model_flops_per_token(**SIZES, seq_len=64, attention="sparse")
  with pytest.raises(ValueError, match="num_heads=7"):
    flops.model_flops_per_token(**dict(SIZES, num_heads=7), seq_len=64)
  with pytest.raises(ValueError, match="block_size must be a power of two >= 2, got 12"):
    flops.model_flops_per_token(**SIZES, seq_len=64, block_size=12)


def test_peak_flops_table():
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("NVIDIA A100-SXM4-40GB", jnp.float32) == 19.5e12
  assert flops.peak_flops("TPU v4", jnp.float32) is None
  assert flops.peak_flops("cpu") is None


def test_cpu_peak_and_mfu():
  peak = flops.measure_cpu_matmul_peak(size=128, seconds=0.05)
  assert math.isfinite(peak) and 1e6 < peak < 1e14
  assert flops.mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)
  assert math.isnan(flops.mfu(1000.0, 2e9, None))
