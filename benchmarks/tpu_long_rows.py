"""The longest row one TPU chip can train on at batch 1, by attention, compiled with libtpu on
this CPU machine (no chip used).

  python -m benchmarks.tpu_long_rows --case tiny,sample,v5e,none [--case ...]

A case is WIDTH,ATTENTION,CHIP,REMAT: WIDTH tiny (gin/tiny.gin: 2 layers, d_model 128, 4
heads, vocabulary 1024) or 53m (gin/lm1b_53m.gin: 6 layers, d_model 512, 8 heads, vocabulary
32768); ATTENTION sample or fine (hierarchical, that query mode), full (XLA's
jax.nn.dot_product_attention) or flash (the Pallas TPU kernel, lm1b.flash_attention);
CHIP v5e (v5e:1x1, 16 GiB) or v5p (v5p:1x1x1, 95 GiB); REMAT a ModelConfig.remat policy.
Both widths run in bfloat16 with block size 16, scanned layers, rotary positions (no position
table to grow with the row) and no relative bias. The train step (AdamW state included) is
compiled at batch 1 for row lengths that are powers of two, ModelConfig.max_len = the row,
and lm1b.fit_search finds the longest that fits from the bytes each compile needs. Records go
to benchmarks/results/tpu_long_rows.json (a case measured again replaces its record) and the
table to benchmarks/results/tpu_long_rows.md.
"""

import argparse
import os

from benchmarks import common
from lm1b import cli, fit_search, run_config, tpu_compile

JSON_PATH = os.path.join(common.RESULTS_DIR, "tpu_long_rows.json")
WIDTHS = {"tiny": "gin/tiny.gin", "53m": "gin/lm1b_53m.gin"}
ATTENTIONS = {
    "sample": ['ModelConfig.attention = "hierarchical"', 'ModelConfig.query_mode = "sample"'],
    "fine": ['ModelConfig.attention = "hierarchical"', 'ModelConfig.query_mode = "fine"'],
    "full": ['ModelConfig.attention = "full"'],
    "flash": ['ModelConfig.attention = "full"', 'ModelConfig.full_attention_kernel = "flash"'],
}
CHIPS = {"v5e": "v5e:1x1", "v5p": "v5p:1x1x1"}
LENGTHS = [2**k for k in range(10, 25)]  # 1k .. 16M positions
START = 16384


def _case(text: str) -> dict:
  parts = text.split(",")
  if (len(parts) != 4 or parts[0] not in WIDTHS or parts[1] not in ATTENTIONS
      or parts[2] not in CHIPS):
    raise argparse.ArgumentTypeError(
        f"--case {text!r}: expected WIDTH,ATTENTION,CHIP,REMAT with WIDTH in {tuple(WIDTHS)}, "
        f"ATTENTION in {tuple(ATTENTIONS)}, CHIP in {tuple(CHIPS)}")
  return dict(width=parts[0], attention=parts[1], chip=parts[2], remat=parts[3])


def _config(case: dict, length: int) -> run_config.RunConfig:
  params = ATTENTIONS[case["attention"]] + [
      'ModelConfig.dtype = "bfloat16"', "ModelConfig.block_size = 16",
      "ModelConfig.scan_layers = True", f'ModelConfig.remat = "{case["remat"]}"',
      'ModelConfig.position_encoding = "rotary"', 'ModelConfig.relative_bias = "none"',
      f"ModelConfig.max_len = {length}", f"build_inputs.seq_len = {length}",
      "build_inputs.global_batch = 1"]
  cli.parse_gin([cli.resolve_gin_file(WIDTHS[case["width"]])], params)
  return run_config.build()


def measure(case: dict) -> dict:
  """Searches the case's longest row; its record."""
  topology = CHIPS[case["chip"]]
  devices = tpu_compile.topology_devices(topology)
  tried = []

  def one(length: int) -> fit_search.Need:
    config = _config(case, length)
    record, _ = tpu_compile.check(topology, "train", config, config.mesh(devices=devices), 1,
                                  length)
    tried.append(record)
    return fit_search.Need(length, record["peak_bytes"], record["hbm_bytes"],
                           record["argument_bytes"], record["refused"])

  longest, _ = fit_search.largest_fitting(one, LENGTHS, START)
  at_longest = next((r for r in tried if r["seq_len"] == longest), {})
  return dict(case, topology=topology, longest=longest,
              peak_bytes=at_longest.get("peak_bytes"), hbm_bytes=tried[-1]["hbm_bytes"],
              compiles=len(tried), compile_seconds=round(sum(r["compile_seconds"]
                                                             for r in tried), 1),
              tried=[[r["seq_len"], r["peak_bytes"], r["fits"]] for r in tried])


def _key(record: dict) -> tuple:
  return tuple(record[k] for k in ("width", "attention", "chip", "remat"))


def _needed(record: dict, length: int) -> int | None:
  return next((needed for seq_len, needed, _ in record["tried"] if seq_len == length), None)


def _gib(value: int | None) -> str:
  return "-" if value is None else f"{value / 2**30:.2f}"


def write(records: list[dict]) -> None:
  records = sorted(records, key=lambda r: (r["width"] != "tiny", r["chip"], r["remat"] != "none",
                                           r["remat"], list(ATTENTIONS).index(r["attention"])))
  header = ["width", "attention", "chip", "remat", "longest row (positions)",
            "its peak GiB/chip", "twice as long needs GiB", "chip GiB", "compiles",
            "compile s (all)"]
  rows = [[r["width"], r["attention"], r["chip"], r["remat"], f"{r['longest']:,}",
           _gib(r["peak_bytes"]), _gib(_needed(r, 2 * r["longest"])),
           f"{r['hbm_bytes'] / 2**30:.0f}", r["compiles"], r["compile_seconds"]]
          for r in records]
  common.write_report(
      os.path.join(common.RESULTS_DIR, "tpu_long_rows.md"), "Longest row per TPU chip",
      ["The train step (AdamW) at batch 1 compiled by libtpu on this CPU machine for one chip; "
       "row lengths are powers of two, so the true limit lies below twice the figure "
       "(what twice the row needs, a compile the search made, says how far below). "
       "Peak: arguments + outputs - aliased + temporaries, XLA's memory analysis.", "",
       common.markdown_table(header, rows)])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", type=_case, action="append", required=True)
  args = parser.parse_args(argv)
  for case in args.case:
    new = measure(case)
    print(f"{_key(new)}: longest row {new['longest']} in {new['compiles']} compiles",
          flush=True)
    write(common.merge_records(JSON_PATH, [new], _key))


if __name__ == "__main__":
  main()
