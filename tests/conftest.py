"""Shared pytest setup: run JAX on the CPU, never on an accelerator found by chance."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
