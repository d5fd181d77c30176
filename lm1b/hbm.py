"""High-bandwidth memory (HBM) per chip by jax `device_kind`, for the compile check
(lm1b.tpu_compile): what one device of a TPU slice can hold."""

GIB = 2**30

# Bytes of HBM per device (one TensorCore device per chip on these, megacore on v4/v5p).
HBM_BYTES: dict[str, int] = {
    "TPU v2": 8 * GIB,
    "TPU v3": 16 * GIB,
    "TPU v4": 32 * GIB,
    "TPU v4 lite": 8 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5e": 16 * GIB,
    "TPU v5": 95 * GIB,
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,
    "TPU v6e": 32 * GIB,
    "TPU7x": 192 * GIB,
}


def hbm_bytes(device_kind: str) -> int | None:
  """HBM bytes of one device of `device_kind`, None when unknown.

  Exact table keys first, then the longest key that prefixes device_kind.
  """
  if device_kind in HBM_BYTES:
    return HBM_BYTES[device_kind]
  prefixes = [key for key in HBM_BYTES if device_kind.startswith(key)]
  return HBM_BYTES[max(prefixes, key=len)] if prefixes else None
