"""The decoder's stack of layers: a Python loop or one scanned layer body, with or without
rematerialisation (ModelConfig.scan_layers, ModelConfig.remat).

Unscanned, layer i's parameters are `block_{i}/...` ([...] each); scanned, they are one tree
`blocks/block/...` whose every array has a leading layer axis [num_layers, ...] (logical axis
name "layers", never sharded). The numbers are the same either way (tests/test_layer_stack.py);
the compiled program differs: XLA compiles one layer body instead of num_layers copies, which
cuts the compile time (see benchmarks/tpu_compile.py).

Remat policies (what the backward pass keeps from the forward pass of each layer):
  "none"           everything XLA chooses to keep (no rematerialisation)
  "full"           only the layer's input; the layer's forward is recomputed in the backward
  "save_matmuls"   the outputs of the matmuls (jax.checkpoint_policies.checkpoint_dots);
                   element-wise work (GELU, LayerNorm, softmax) is recomputed
"""

from typing import Any, Callable

import flax.linen as nn
import jax

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": None,
    "save_matmuls": jax.checkpoint_policies.checkpoint_dots,
}
LAYER_AXIS = "layers"
SCANNED_NAME = "blocks"
# DecoderBlock.__call__(self, x, rotation, bias, segment_ids, deterministic): `deterministic`
# is a Python bool, static for remat (flax counts `self` as argument 0).
_DETERMINISTIC_ARGNUM = 5


def block_class(block: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block` (DecoderBlock), wrapped in nn.remat with the policy named `remat`."""
  if remat == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=True,
                  static_argnums=(_DETERMINISTIC_ARGNUM,))


class _ScanBody(nn.Module):
  """One layer as a scan body: (x, broadcast args) -> (x, None)."""

  block: type[nn.Module]
  config: Any
  decode: bool = False

  @nn.compact
  def __call__(self, x, rotation, bias, segment_ids, deterministic: bool):
    x = self.block(self.config, self.decode, name="block")(x, rotation, bias, segment_ids,
                                                         deterministic)
    return x, None


def apply_layers(block: type[nn.Module], config: Any, decode: bool, x, rotation, bias,
                 segment_ids, deterministic: bool):
  """Runs config.num_layers blocks over x [batch, length, d_model]; call inside a compact
  method of the parent module (the blocks become its submodules).

  rotation, bias, segment_ids: as DecoderBlock takes them, the same for every layer.
  Returns [batch, length, d_model].
  """
  layer = block_class(block, config.remat)
  if not config.scan_layers:
    for index in range(config.num_layers):
      x = layer(config, decode, name=f"block_{index}")(x, rotation, bias, segment_ids,
                                                        deterministic)
    return x
  scanned = nn.scan(
      _ScanBody, variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
      length=config.num_layers, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
  x, _ = scanned(layer, config, decode, name=SCANNED_NAME)(x, rotation, bias, segment_ids,
                                                            deterministic)
  return x


def layout_hint(saved_paths: set[str], expected_paths: set[str]) -> str:
  """A sentence explaining a checkpoint mismatch caused by ModelConfig.scan_layers, or "".

  saved_paths / expected_paths: "/"-joined tree paths of the checkpoint and of the model.
  """
  def scanned(paths):
    return any(f"{SCANNED_NAME}/" in p for p in paths)

  def unscanned(paths):
    return any("block_0/" in p for p in paths)

  if scanned(saved_paths) and unscanned(expected_paths):
    return ("the checkpoint was saved with ModelConfig.scan_layers=True (one stacked "
            "'blocks' tree) and this model has scan_layers=False (block_0, block_1, ...): "
            "set ModelConfig.scan_layers = True to read it")
  if unscanned(saved_paths) and scanned(expected_paths):
    return ("the checkpoint was saved with ModelConfig.scan_layers=False (block_0, block_1, "
            "...) and this model has scan_layers=True (one stacked 'blocks' tree): set "
            "ModelConfig.scan_layers = False to read it")
  return ""


def stack_layers(params: dict, num_layers: int) -> dict:
  """An unscanned parameter tree (block_0 ... block_{N-1}) as the scanned model holds it
  (blocks/block/... with a leading [num_layers] axis); other entries unchanged."""
  layers = [params[f"block_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  return {**rest, SCANNED_NAME: {"block": jax.tree.map(lambda *a: jax.numpy.stack(a),
                                                       *layers)}}


def unstack_layers(params: dict) -> dict:
  """Inverse of stack_layers."""
  stacked = params[SCANNED_NAME]["block"]
  count = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != SCANNED_NAME}
  return {**rest, **{f"block_{i}": jax.tree.map(lambda a, i=i: a[i], stacked)
                     for i in range(count)}}
