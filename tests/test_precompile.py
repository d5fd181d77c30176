"""train.py compiles its train step before preparing data where HLM1B_PRECOMPILE (or a TPU
backend) asks for it, so that a step that does not fit stops the run before the hour-long
data preparation (lm1b.aot); the compiler's out-of-memory messages read; and the largest-batch
search of lm1b.tpu_compile (its compiles replaced by a rule, so no libtpu is needed)."""

import types

import pytest

from lm1b import aot, cli, tpu_compile, train
import test_train
from test_train import gin_flags, micro_params

micro = test_train.micro  # the fixture: a micro corpus and data root


class _Preparing(Exception):
  """Raised where the data preparation would start (the test needs nothing after it)."""


def test_precompile_runs_before_data_preparation(micro, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HLM1B_PRECOMPILE", "1")

  def prepare_data(*args, **kwargs):
    print("preparing data now", flush=True)
    raise _Preparing

  monkeypatch.setattr(train.input_pipeline, "prepare_data", prepare_data)
  argv = ["--workdir", str(tmp_path / "run"), *gin_flags(micro_params(micro[0], num_steps=2))]
  with pytest.raises(_Preparing):
    cli.train_main(argv)
  out = capsys.readouterr().out
  compiled = out.index("train step compiled before data preparation: peak ")
  assert compiled < out.index("preparing data now"), out
  monkeypatch.setenv("HLM1B_PRECOMPILE", "0")
  with pytest.raises(_Preparing):
    cli.train_main(argv)
  assert "compiled before data preparation" not in capsys.readouterr().out


def test_a_step_that_does_not_fit_stops_before_data_preparation(micro, tmp_path,
                                                                 monkeypatch, capsys):
  monkeypatch.setenv("HLM1B_PRECOMPILE", "1")
  monkeypatch.setattr(aot.hbm, "hbm_bytes", lambda kind: 1024)  # a 1 KiB "chip"
  workdir = tmp_path / "run"
  argv = ["--workdir", str(workdir), *gin_flags(micro_params(micro[0], num_steps=2))]
  assert cli.train_main(argv) == cli.EXIT_FAILURE
  captured = capsys.readouterr()
  line, = captured.err.strip().splitlines()
  assert line.startswith("error: train step needs "), line
  assert "GiB per device, a cpu has 0.00 GiB; try a smaller global batch, fsdp" in line
  assert "ModelConfig.remat" in line
  assert "model: " not in captured.out
  assert not (workdir / "tokenizer.model").exists()


@pytest.mark.parametrize("value,backend,wanted", [("1", "cpu", True), ("0", "tpu", False),
                                                  ("", "tpu", True), ("", "cpu", False)])
def test_precompile_switch(monkeypatch, value, backend, wanted):
  monkeypatch.setenv("HLM1B_PRECOMPILE", value)
  monkeypatch.setattr(aot.jax, "default_backend", lambda: backend)
  assert aot.precompile_wanted() is wanted


@pytest.mark.parametrize("message,needed,available", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (144.87G) exceeds available HBM (15.75G).", 144.87 * 2**30, 15.75 * 2**30),
    ("Ran out of memory in memory space hbm. Used 48.88G of 15.75G hbm. Exceeded hbm capacity "
     "by 33.13G.", 48.88 * 2**30, 15.75 * 2**30),
])
def test_refusals_of_the_tpu_compiler_are_read(message, needed, available):
  assert aot.refused_bytes(message) == (int(needed), int(available))
  assert aot.refused_bytes("INTERNAL: something else") is None


def test_a_refused_program_never_fits_even_within_the_chips_nominal_size():
  class Refused:  # a jax Lowered whose compile the TPU compiler refuses
    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used "
                         "15.94G of 15.75G hbm. Exceeded hbm capacity by 193.5M.")

  fit = aot.compile_fit(Refused(), "TPU v5 lite")  # 15.94 GiB < the chip's 16 GiB
  assert fit.refused and not fit.fits
  assert (fit.peak_bytes, fit.hbm_bytes) == (int(15.94 * 2**30), int(15.75 * 2**30))


@pytest.mark.parametrize("limit,start,want", [(200, 256, 200), (200, 8, 200), (7, 64, 0),
                                              (4096, 256, 4096)])
def test_find_max_batch_searches_multiples_of_the_row_shards(monkeypatch, capsys, limit,
                                                             start, want):
  tried = []

  def check(topology, program, config, mesh, batch, seq_len):
    tried.append(batch)
    needed = 1000 + 10 * batch  # state + activations per row
    return {"peak_bytes": needed, "hbm_bytes": 1000 + 10 * limit + 1,
            "argument_bytes": 1000, "refused": False}, None

  monkeypatch.setattr(tpu_compile, "check", check)
  mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1})
  largest, points = tpu_compile.find_max_batch("v5e:2x4", None, mesh, 256, start)
  assert largest == want and [p.size for p in points] == tried
  assert all(batch % 8 == 0 for batch in tried) and len(tried) == len(set(tried))
  assert len(tried) <= 4, tried
  assert f"largest global batch whose train step fits at seq_len 256: {want} " \
      f"({len(tried)} compiles)" in capsys.readouterr().out
