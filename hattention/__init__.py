"""Hierarchical attention (H-Transformer-1D) as pure JAX functions."""

from hattention.attention import hierarchical_attention
from hattention.decode import decode_step, init_cache
from hattention.geometry import (QUERY_MODES, PackingSlot, level_count, packing_slot,
                                 padded_length)
from hattention.kv_cache import kv_cache_step

__all__ = ["hierarchical_attention", "init_cache", "decode_step", "kv_cache_step",
           "packing_slot", "PackingSlot", "padded_length", "level_count", "QUERY_MODES"]
