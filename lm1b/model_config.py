"""The model's hyperparameters: `ModelConfig` and the choices it validates.

Kept apart from lm1b.model (the layers) so that configuration code (lm1b.run_config, the
readers) can name and check a model without the layer code.
"""

import dataclasses

import jax.numpy as jnp

from hattention import QUERY_MODES
from lm1b.errors import ConfigError
from lm1b.layer_stack import REMAT_POLICIES

ATTENTION_KINDS = ("hierarchical", "full")
FULL_ATTENTION_KERNELS = ("xla", "flash")
POSITION_ENCODINGS = ("learned", "rotary", "none")
# Each relative bias and the attention it is for (None: any).
RELATIVE_BIAS_ATTENTION = {"none": None, "hierarchical": "hierarchical", "t5": "full"}




@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of `DecoderLM` (hashable, so usable as a jit static arg).

  dtype is the compute dtype name ("bfloat16" or "float32"); parameters are
  always float32. num_levels=None uses every level of the hierarchy.
  position_encoding is one of POSITION_ENCODINGS ("rotary" needs an even
  head_dim and has no position table).

  relative_bias is one of RELATIVE_BIAS_ATTENTION: "hierarchical" (hierarchical
  attention) gives every layer a table [4 * block_size - 1, H], "t5" (full
  attention) gives the model one table [t5_bias.NUM_BUCKETS, H]; tables are
  float32, N(0, 0.1) at initialisation. H is num_heads, or 1 with
  relative_bias_shared_heads (one column for every head).
  relative_bias_per_level (hierarchical only): a table per level instead,
  [level_count(max_len, block_size, num_levels), 4 * block_size - 1, H].
  relative_bias_level_discount (needs per_level): level l's table starts at
  N(0, 0.1) - l * log(2), so that a full cell of 2**l keys, which the rule
  weighs by its count of real keys, weighs as one key at initialisation (a
  candidate fix, not the paper's).

  scan_layers: one scanned layer body instead of num_layers copies (same numbers,
  another parameter tree); remat: "none", "full" or "save_matmuls" (see
  lm1b.layer_stack).
  full_attention_kernel (attention="full"): "xla" (jax.nn.dot_product_attention) or
  "flash" (the Pallas TPU kernel, lm1b.flash_attention: no [L, L] scores in memory;
  rows a multiple of 128, no relative bias; XLA's attention off TPU). remat and
  full_attention_kernel may change when a run resumes (the parameters are the same).
  """

  vocab_size: int = 8000
  num_layers: int = 6
  num_heads: int = 8
  d_model: int = 512
  d_ff: int = 2048
  max_len: int = 512
  dropout_rate: float = 0.1
  attention: str = "hierarchical"
  block_size: int = 16
  query_mode: str = "sample"
  num_levels: int | None = None
  dtype: str = "bfloat16"
  tie_embeddings: bool = False
  position_encoding: str = "learned"
  relative_bias: str = "none"
  relative_bias_shared_heads: bool = False
  relative_bias_per_level: bool = False
  relative_bias_level_discount: bool = False
  scan_layers: bool = False
  remat: str = "none"
  full_attention_kernel: str = "xla"

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff",
                 "max_len", "block_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"ModelConfig.{name}={value!r} must be a positive int")
    if self.d_model % self.num_heads:
      raise ConfigError(f"ModelConfig.d_model={self.d_model} must be divisible "
                       f"by num_heads={self.num_heads}")
    if self.attention not in ATTENTION_KINDS:
      raise ConfigError(f"ModelConfig.attention={self.attention!r} must be one "
                       f"of {ATTENTION_KINDS}")
    if self.query_mode not in QUERY_MODES:
      raise ConfigError(f"ModelConfig.query_mode={self.query_mode!r} must be "
                       f"one of {QUERY_MODES}")
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ConfigError(f"ModelConfig.position_encoding={self.position_encoding!r} must be "
                        f"one of {POSITION_ENCODINGS}")
    if self.position_encoding == "rotary" and self.head_dim % 2:
      raise ConfigError(f"ModelConfig.position_encoding='rotary' needs an even head_dim, got "
                        f"d_model / num_heads = {self.head_dim}")
    self._check_relative_bias()
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"ModelConfig.remat={self.remat!r} must be one of {tuple(REMAT_POLICIES)}")
    self._check_kernel()
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"ModelConfig.dropout_rate={self.dropout_rate!r} must "
                       "be in [0, 1)")
    try:
      jnp.dtype(self.dtype)
    except TypeError as error:
      raise ConfigError(f"ModelConfig.dtype={self.dtype!r} is not a dtype "
                       "name") from error

  def _check_kernel(self):
    kernel = self.full_attention_kernel
    if kernel not in FULL_ATTENTION_KERNELS:
      raise ConfigError(f"ModelConfig.full_attention_kernel={kernel!r} must be one of "
                        f"{FULL_ATTENTION_KERNELS}")
    if kernel == "flash" and self.attention != "full":
      raise ConfigError("ModelConfig.full_attention_kernel='flash' needs attention='full', "
                        f"got attention={self.attention!r}")
    if kernel == "flash" and self.relative_bias != "none":
      raise ConfigError("ModelConfig.full_attention_kernel='flash' takes no relative bias, "
                        f"got relative_bias={self.relative_bias!r}")

  def _check_relative_bias(self):
    bias = self.relative_bias
    if bias not in RELATIVE_BIAS_ATTENTION:
      raise ConfigError(f"ModelConfig.relative_bias={bias!r} must be one of "
                        f"{tuple(RELATIVE_BIAS_ATTENTION)}")
    needs = RELATIVE_BIAS_ATTENTION[bias]
    if needs not in (None, self.attention):
      raise ConfigError(f"ModelConfig.relative_bias={bias!r} needs attention={needs!r}, got "
                        f"attention={self.attention!r}")
    if self.relative_bias_shared_heads and bias == "none":
      raise ConfigError("ModelConfig.relative_bias_shared_heads=True needs a relative_bias, "
                        "got relative_bias='none'")
    if self.relative_bias_per_level and bias != "hierarchical":
      raise ConfigError("ModelConfig.relative_bias_per_level=True needs "
                        f"relative_bias='hierarchical', got relative_bias={bias!r}")
    if self.relative_bias_level_discount and not self.relative_bias_per_level:
      raise ConfigError("ModelConfig.relative_bias_level_discount=True needs "
                        "relative_bias_per_level=True")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)
