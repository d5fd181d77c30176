"""Memory fit, collectives and compile time of the paper's models on TPU slices, compiled on
this CPU machine with libtpu (lm1b.tpu_compile; no chip used).

  python -m benchmarks.tpu_compile --case 53m,hierarchical,v5e:2x4,scan [--case ...]
      [--global_batch 256] [--seq_len 256] [--max_batch]

A case is CONFIG,ATTENTION,TOPOLOGY[,scan][,remat=POLICY][,fsdp]: CONFIG 53m or 144m
(gin/lm1b_CONFIG.gin, or gin/lm1b_CONFIG_full.gin for full attention, with
full_attention_kernel = "flash" for ATTENTION flash), TOPOLOGY a libtpu layout or a Cloud TPU
accelerator type (lm1b.tpu_topology), scan sets
ModelConfig.scan_layers, fsdp shards parameters over every chip (make_mesh.fsdp = -1,
data = 1). --max_batch searches the largest global batch whose train step fits instead.
Every record is appended to benchmarks/results/tpu_compile.json (one JSON object a line; a
case measured again replaces its older record) and the table in
benchmarks/results/tpu_compile.md is rewritten from all of them. Compiles take minutes: run
one case per invocation in the background if the machine is shared.
"""

import argparse
import os

from benchmarks import common
from lm1b import cli, run_config, tpu_compile

JSON_PATH = os.path.join(common.RESULTS_DIR, "tpu_compile.json")
GIB = 2**30
# hierarchical: gin/lm1b_CONFIG.gin; full: gin/lm1b_CONFIG_full.gin (XLA's attention); flash:
# the same with the Pallas TPU kernel (ModelConfig.full_attention_kernel = "flash").
ATTENTIONS = ("hierarchical", "full", "flash")


def _case(text: str) -> dict:
  parts = text.split(",")
  if len(parts) < 3 or parts[0] not in ("53m", "144m") or parts[1] not in ATTENTIONS:
    raise argparse.ArgumentTypeError(f"--case {text!r}: expected CONFIG,ATTENTION,TOPOLOGY"
                                     "[,scan][,remat=POLICY][,fsdp]")
  options = dict(config=parts[0], attention=parts[1], topology=parts[2], scan=False,
                 remat="none", fsdp=False)
  for option in parts[3:]:
    if option in ("scan", "fsdp"):
      options[option] = True
    elif option.startswith("remat="):
      options["remat"] = option.split("=", 1)[1]
    else:
      raise argparse.ArgumentTypeError(f"--case {text!r}: unknown option {option!r}")
  return options


def _gin(case: dict) -> tuple[list[str], list[str]]:
  suffix = "" if case["attention"] == "hierarchical" else "_full"
  files = [cli.resolve_gin_file(f"gin/lm1b_{case['config']}{suffix}.gin")]
  params = [f"ModelConfig.scan_layers = {case['scan']}",
            f"ModelConfig.remat = {case['remat']!r}".replace("'", '"')]
  if case["attention"] == "flash":
    params.append('ModelConfig.full_attention_kernel = "flash"')
  if case["fsdp"]:
    params += ["make_mesh.data = 1", "make_mesh.fsdp = -1"]
  return files, params


def measure(case: dict, global_batch: int, seq_len: int, max_batch: bool) -> list[dict]:
  """Compiles the case's train step (or searches its largest batch); its records."""
  files, params = _gin(case)
  cli.parse_gin(files, params)
  config = run_config.build()
  mesh = config.mesh(devices=tpu_compile.topology_devices(case["topology"]))
  if max_batch:
    largest, points = tpu_compile.find_max_batch(case["topology"], config, mesh, seq_len,
                                                 global_batch)
    peak = next((p.needed for p in points if p.size == largest), None)
    return [dict(case, kind="max_batch", max_global_batch=largest, seq_len=seq_len,
                 compiles=len(points), peak_bytes=peak,
                 tried=[[p.size, p.needed] for p in points])]
  record, _ = tpu_compile.check(case["topology"], "train", config, mesh, global_batch, seq_len)
  return [dict(record, **case, kind="train")]


def _key(record: dict) -> tuple:
  return tuple(record.get(k) for k in ("kind", "config", "attention", "topology", "scan",
                                       "remat", "fsdp", "global_batch", "seq_len"))


def _gib(value) -> str:
  return "-" if value is None else f"{value / GIB:.2f}"


def write(records: list[dict]) -> None:
  """The markdown table of all records."""
  train = [r for r in records if r["kind"] == "train"]
  header = ["model", "attention", "topology", "mesh", "scan", "remat", "batch x seq",
            "args GiB", "temp GiB", "peak GiB/chip", "HBM GiB", "fits", "lower s", "compile s",
            "HLO instructions", "collective MiB/step", "model TFLOP/step"]
  rows = [[r["config"], r["attention"], r["topology"],
           ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1",
           "yes" if r["scan"] else "no", r["remat"], f"{r['global_batch']} x {r['seq_len']}",
           _gib(r["argument_bytes"]), _gib(r["temp_bytes"]), _gib(r["peak_bytes"]),
           _gib(r["hbm_bytes"]), "yes" if r["fits"] else "**no**",
           r.get("lower_seconds") or "-", r["compile_seconds"], r.get("hlo_instructions") or "-",
           "-" if r["collective_bytes"] is None else f"{r['collective_bytes'] / 2**20:.1f}",
           f"{r['model_flops'] / 1e12:.2f}"] for r in train]
  largest = [[r["config"], r["attention"], r["topology"], "yes" if r["scan"] else "no",
              r["remat"], "yes" if r["fsdp"] else "no", r["seq_len"], r["max_global_batch"],
              _gib(r.get("peak_bytes")), r.get("compiles", "-")]
             for r in records if r["kind"] == "max_batch"]
  sections = ["Train steps compiled for TPU topologies by libtpu on this CPU machine "
              "(lm1b.tpu_compile); per-chip bytes from XLA's memory analysis, collective "
              "bytes per chip per step from the HLO, model FLOPs per step from lm1b.flops. "
              "Lower s: tracing and lowering to StableHLO; compile s: XLA's TPU "
              "compile, on this shared 2-core machine; '-': not recorded (older records). "
              "Collective '-': not counted (records made before lm1b.hlo_collectives "
              "counted the trips of TPU loops, which undercounted scanned layers; rerun "
              "the case).", "",
              common.markdown_table(header, rows)]
  if largest:
    sections += ["", "Largest global batch whose train step fits:", "",
                 common.markdown_table(["model", "attention", "topology", "scan", "remat",
                                        "fsdp", "seq_len", "largest global batch",
                                        "its peak GiB/chip", "compiles"], largest)]
  common.write_report(os.path.join(common.RESULTS_DIR, "tpu_compile.md"),
                      "TPU compile check", sections)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", type=_case, action="append", required=True)
  parser.add_argument("--global_batch", type=int, default=256)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--max_batch", action="store_true")
  args = parser.parse_args(argv)
  for case in args.case:
    new = measure(case, args.global_batch, args.seq_len, args.max_batch)
    write(common.merge_records(JSON_PATH, new, _key))


if __name__ == "__main__":
  main()
