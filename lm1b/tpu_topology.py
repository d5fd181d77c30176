"""TPU topologies by name, for compiling on a machine without a chip (libtpu only).

A name is either libtpu's topology layout, GENERATION:SHAPE in chips ("v5e:2x4", "v4:2x2x1",
"v5p:2x2x2", "v6e:4x4"), or a Cloud TPU accelerator type as `gcloud` spells it ("v5litepod-8",
"v5e-8", "v6e-16", "v4-8", "v4-32", "v5p-8"), where the number counts chips for v5e/v6e and
TensorCores (two per chip) for v4/v5p.

Two things libtpu needs told that users should not have to know:
- v4 and v5p chips have two TensorCores that jax drives as one device ("megacore"); without
  chip_config_name="megacore" libtpu lists one device per core, over which jax refuses to
  build a mesh;
- a host holds a 2x2x1 block of chips by default, so smaller slices ("v5e:1x1") need
  chips_per_host_bounds to say so.
"""

import importlib.util
import os
import re

# libtpu looks for a TPU VM's metadata at start-up unless told what it is, and takes a
# machine-wide lock (/tmp/libtpu_lockfile) that would keep two compile checks from running at
# once; neither matters where no chip is used.
_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost",
               "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

_MEGACORE = ("v4", "v5p")
# Cloud TPU accelerator-type prefix -> (libtpu generation, TensorCores per counted unit).
_ACCELERATOR_TYPES = {"v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v6e": ("v6e", 1),
                      "v4": ("v4", 2), "v5p": ("v5p", 2)}
# Slice shapes by chip count: 2-D tori (v5e, v6e) and 3-D (v4, v5p), as Cloud TPU lays them out.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
              128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16",
              4096: "16x16x16"}
_DEFAULT_HOST_BOUNDS = (2, 2, 1)


class TopologyError(ValueError):
  """A topology name that is malformed or that libtpu refuses (one line)."""


def layout(name: str) -> str:
  """libtpu's topology layout for `name`: "v5litepod-8" -> "v5e:2x4", "v4-8" -> "v4:2x2x1";
  a layout ("v5e:2x4") is returned as given."""
  if ":" in name:
    return name
  match = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p)-(\d+)", name)
  if not match:
    raise TopologyError(f"{name!r} is neither a layout like 'v5e:2x4' nor an accelerator type "
                        f"like 'v5litepod-8' or 'v4-8'")
  generation, cores_per_chip = _ACCELERATOR_TYPES[match.group(1)]
  count = int(match.group(2))
  chips, remainder = divmod(count, cores_per_chip)
  shapes = _SHAPES_2D if cores_per_chip == 1 else _SHAPES_3D
  if remainder or chips not in shapes:
    unit = "chips" if cores_per_chip == 1 else "TensorCores (2 per chip)"
    sizes = ", ".join(str(c * cores_per_chip) for c in shapes)
    raise TopologyError(f"{name!r}: {count} {unit} is not a slice size known here ({sizes}); "
                        f"give the layout instead, e.g. '{generation}:{shapes[8]}'")
  return f"{generation}:{shapes[chips]}"


def compile_options(topology_layout: str) -> dict:
  """Keyword arguments of jax's get_topology_desc for a layout (megacore, host bounds)."""
  generation, _, shape = topology_layout.partition(":")
  options = {}
  if generation in _MEGACORE:
    options["chip_config_name"] = "megacore"
  if re.fullmatch(r"\d+(x\d+){0,2}", shape):
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    bounds = [min(d, b) for d, b in zip(dims, _DEFAULT_HOST_BOUNDS)]
    if tuple(bounds) != _DEFAULT_HOST_BOUNDS:
      options["chips_per_host_bounds"] = bounds
  return options


def devices(name: str) -> list:
  """The jax devices (one per chip) of TPU topology `name`, for compiling only.

  Raises TopologyError when libtpu is missing or refuses the name.
  """
  topology_layout = layout(name)
  for key, value in _LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology_layout,
                                               **compile_options(topology_layout))
    return list(description.devices)
  except Exception as error:  # pylint: disable=broad-except  (RuntimeError, XlaRuntimeError)
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    shown = name if topology_layout == name else f"{name} ({topology_layout})"
    hint = "" if importlib.util.find_spec("libtpu") else "; needs libtpu: pip install -r " \
        "requirements-tpu.txt"
    raise TopologyError(f"no TPU topology {shown} here ({first}{hint})") from error
