"""lm1b.tpu_compile compiles the pipeline's train step for a TPU topology on this CPU machine
(libtpu, no chip). Marked `tpu_compile`: needs requirements-tpu.txt, skipped elsewhere; run
with `python -m pytest -q -m tpu_compile` in a virtualenv that has it (.ci/run does)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lm1b import hbm, model, partitioning, tpu_compile

REPO = pathlib.Path(__file__).resolve().parent.parent
TOPOLOGY = "v5e:2x2"  # 4 chips of 16 GiB
# gin/tiny.gin with its two layers scanned and short rows: compiles in seconds.
PARAMS = ["ModelConfig.num_layers = 2", "ModelConfig.scan_layers = True",
          "ModelConfig.max_len = 32", "build_inputs.seq_len = 32"]
pytestmark = pytest.mark.tpu_compile


def _run(*flags: str, params=PARAMS) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "lm1b.tpu_compile", "--topology", TOPOLOGY,
             "--gin_file", "gin/tiny.gin",
             *[flag for param in params for flag in ("--gin_param", param)], *flags]
  return subprocess.run(command, cwd=REPO, text=True, capture_output=True, timeout=600,
                        check=False)


def _records(stdout: str) -> list[dict]:
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_train_step_fits_and_its_arguments_are_the_state_and_a_batch_shard():
  run = _run("--global_batch", "16")
  assert run.returncode == 0, run.stderr[-3000:]
  record, = _records(run.stdout)
  assert record["topology"] == TOPOLOGY and record["device_kind"] == "TPU v5 lite"
  assert record["program"] == "train" and record["fits"] is True
  assert record["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert record["hbm_bytes"] == hbm.hbm_bytes("TPU v5 lite") == 16 * 2**30
  # Independently from the shapes: float32 parameters, AdamW's two float32 moments of each,
  # all replicated (pure data parallelism), plus one device's 4 of the 16 rows of five
  # [B, 32] int32/float32 batch arrays. TPU layouts pad small arrays: allow 2 % on top.
  config = model.ModelConfig(vocab_size=1024, num_layers=2, num_heads=4, d_model=128,
                             d_ff=512, max_len=32)
  count = model.count_params(config)
  params = 3 * 4 * count
  batch = 5 * 4 * (16 // 4) * 32
  assert params + batch <= record["argument_bytes"] <= 1.02 * (params + batch)
  # Data parallelism all-reduces the float32 gradients once per step (the scanned layer's
  # inside the layer loop, counted per trip), plus a few scalars (loss and weight sums).
  assert 4 * count <= record["collective_bytes"] <= 4 * count + 64
  assert record["temp_bytes"] >= 0  # 0 happens: this small step needs no temporaries in HBM
  assert record["peak_bytes"] >= (record["argument_bytes"] + record["output_bytes"]
                                  - record["alias_bytes"] + record["temp_bytes"])
  assert record["model_flops"] > 0 and record["compile_seconds"] > 0
  assert record["lower_seconds"] > 0 and record["hlo_instructions"] > 100
  for key in ("output_bytes", "alias_bytes", "global_batch", "seq_len"):
    assert key in record
  assert record["alias_bytes"] >= params  # the donated state is updated in place


def test_a_batch_far_too_large_exits_1_with_one_line():
  run = _run("--global_batch", str(2**20))
  assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
  record, = _records(run.stdout)
  assert record["fits"] is False and record["peak_bytes"] > 16 * 2**30
  errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
  line, = errors
  # The compiler refused it: the size it refused by is the usable part of the 16 GiB.
  assert line.startswith("error: train needs ") and "GiB per device, a TPU v5 lite has 15.75 " \
      "GiB; try a smaller global batch, fsdp" in line and "remat" in line
  assert record["refused"] is True


def test_an_unknown_topology_exits_2():
  run = _run("--topology", "v5e:3x7")
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith("error: --topology 'v5e:3x7'")


def test_megacore_chips_accelerator_type_names_and_one_chip():
  # v4-8 is 4 chips of two TensorCores that jax drives as one device each (megacore).
  run = _run("--topology", "v4-8", "--global_batch", "8")
  assert run.returncode == 0, run.stderr[-3000:]
  record, = _records(run.stdout)
  assert record["device_kind"] == "TPU v4" and record["mesh"]["data"] == 4
  assert record["hbm_bytes"] == 32 * 2**30 and record["fits"] is True
  run = _run("--topology", "v5e:1x1", "--global_batch", "4")
  assert run.returncode == 0, run.stderr[-3000:]
  record, = _records(run.stdout)
  assert record["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}


def test_flash_kernel_compiles_per_device_without_moving_activations():
  params = [p for p in PARAMS if "seq_len" not in p and "max_len" not in p] + [
      'ModelConfig.attention = "full"', 'ModelConfig.full_attention_kernel = "flash"',
      "ModelConfig.max_len = 128", "build_inputs.seq_len = 128"]
  run = _run("--global_batch", "16", params=params)
  assert run.returncode == 0, run.stderr[-3000:]
  record, = _records(run.stdout)
  count = model.count_params(model.ModelConfig(vocab_size=1024, num_layers=2, num_heads=4,
                                               d_model=128, d_ff=512, max_len=128,
                                               attention="full"))
  # The kernel runs in a shard_map on each device's rows: the only collective is still the
  # gradient all-reduce (an all-gather of the rows would add 16 x 128 x 128 x 4 bytes).
  assert record["fits"] is True
  assert 4 * count <= record["collective_bytes"] <= 4 * count + 64


def test_programs_for_a_tpu_use_the_mosaic_kernel_from_this_cpu_machine():
  config = model.ModelConfig(vocab_size=64, num_layers=1, num_heads=2, d_model=64, d_ff=64,
                             max_len=128, attention="full", position_encoding="rotary",
                             full_attention_kernel="flash")
  mesh = partitioning.make_mesh(devices=tpu_compile.topology_devices(TOPOLOGY))
  decoder = model.DecoderLM(config)
  tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32,
                                sharding=partitioning.batch_sharding(mesh))
  params = jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0),
                                               jnp.ones((1, 8), jnp.int32)))
  with partitioning.mesh_context(mesh):
    text = jax.jit(decoder.apply).lower(params, tokens).as_text()
  assert "tpu_custom_call" in text  # the Mosaic kernel, not the interpreter or XLA's attention
