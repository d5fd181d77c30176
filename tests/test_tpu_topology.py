"""lm1b.tpu_topology: Cloud TPU accelerator types to libtpu layouts, and what libtpu must be
told about megacore chips and small slices (no libtpu needed; tests/test_tpu_compile.py
compiles for these)."""

import re

import pytest

from lm1b import tpu_topology


@pytest.mark.parametrize("name,layout", [
    ("v5litepod-8", "v5e:2x4"), ("v5e-16", "v5e:4x4"), ("v5litepod-256", "v5e:16x16"),
    ("v6e-8", "v6e:2x4"), ("v6e-1", "v6e:1x1"),
    # v4 and v5p count TensorCores, two per chip.
    ("v4-8", "v4:2x2x1"), ("v4-32", "v4:2x2x4"), ("v4-128", "v4:4x4x4"), ("v5p-8", "v5p:2x2x1"),
    ("v5e:2x4", "v5e:2x4"), ("v4:2x2x1", "v4:2x2x1"),
])
def test_accelerator_types_name_their_layout(name, layout):
  assert tpu_topology.layout(name) == layout


@pytest.mark.parametrize("name,message", [
    ("v4-6", "6 TensorCores (2 per chip) is not a slice size known here"),
    ("v5e-12", "12 chips is not a slice size known here"),
    ("tpu-8", "neither a layout like 'v5e:2x4' nor an accelerator type"),
])
def test_unknown_names_say_what_is_expected(name, message):
  with pytest.raises(tpu_topology.TopologyError, match=re.escape(message)):
    tpu_topology.layout(name)


@pytest.mark.parametrize("layout,options", [
    ("v5e:2x4", {}),
    ("v4:2x2x1", {"chip_config_name": "megacore"}),
    ("v5p:2x2x2", {"chip_config_name": "megacore"}),
    ("v5e:1x1", {"chips_per_host_bounds": [1, 1, 1]}),
    ("v4:1x1x1", {"chip_config_name": "megacore", "chips_per_host_bounds": [1, 1, 1]}),
])
def test_compile_options(layout, options):
  assert tpu_topology.compile_options(layout) == options
