"""Position signals and the early learning curve of hierarchical attention against full attention.

Trains (experiment, position choice) pairs with the pipeline's own pieces (`long_context.Run`)
and reports the test split's per-token perplexity (its first `--test_sentences`, default all)
at fixed numbers of training tokens (`--milestones` and the end, `--tokens`), mean (min-max)
over seeds, the number of training tokens a run needs to fall below half the unigram
perplexity (a curve on the first CURVE_SENTENCES test sentences, `--curve_points` points),
and a plot of those curves. Only tokens count here, not time: seeds may run in separate
processes at once (`--seeds 0 --out a.md`, `--seeds 1 --out b.md`, then `--merge a.json
b.json --out all.md` writes the table of both).

Experiments: a name of gin/long_context/ (the document corpus, stream rows of that length,
4096 tokens per step), or "53m_packed" / "53m_full_packed": gin/lm1b_53m.gin /
lm1b_53m_full.gin on the embedded sentence corpus in packed rows of 256 (16 rows, 4096 tokens
per step; float32, no dropout, 100 warmup steps, the 1024-piece BPE tokenizer of gin/tiny.gin:
the settings of a short CPU run). The runs of one call share a corpus.

Position choices (POSITIONS): "rotary" and "learned" (absolute signals), "none", "hier_bias"
(the hierarchical relative bias alone: the paper's model), "hier_bias_per_level" (one table per
level), "hier_bias_discount" (per level, level l starting l * log 2 lower so that a coarse cell
weighs as one key at initialisation), "rotary_hier_bias", and "t5_bias" (full attention's
bucketed bias alone: the paper's baseline).

  python -m benchmarks.position_bias --runs sample_1024:hier_bias full_1024:t5_bias ...
      [--seeds 0 1] [--milestones 150000 300000 600000] [--tokens 819200]
      [--test_sentences N] [--out FILE]
  python -m benchmarks.position_bias --merge A.json B.json --out FILE
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from benchmarks import common, long_context  # noqa: E402
from lm1b import cli, evaluate, input_pipeline, paths, run_config  # noqa: E402
from lm1b.workdir import Workdir  # noqa: E402

_NONE = 'ModelConfig.position_encoding = "none"'
_HIER = 'ModelConfig.relative_bias = "hierarchical"'
_PER_LEVEL = "ModelConfig.relative_bias_per_level = True"
POSITIONS = {
    "rotary": ('ModelConfig.position_encoding = "rotary"',),
    "learned": ('ModelConfig.position_encoding = "learned"',),
    "none": (_NONE,),
    "hier_bias": (_NONE, _HIER),
    "hier_bias_per_level": (_NONE, _HIER, _PER_LEVEL),
    "hier_bias_discount": (_NONE, _HIER, _PER_LEVEL,
                           "ModelConfig.relative_bias_level_discount = True"),
    "rotary_hier_bias": ('ModelConfig.position_encoding = "rotary"', _HIER),
    "t5_bias": (_NONE, 'ModelConfig.relative_bias = "t5"'),
}
_SHORT_CPU_RUN = (
    'make_source.kind = "embedded"', "load_or_train_tokenizer.vocab_size = 1024",
    'load_or_train_tokenizer.model_type = "bpe"',
    "load_or_train_tokenizer.sample_sentences = 50000", "build_inputs.global_batch = 16",
    "build_inputs.eval_global_batch = 64", 'ModelConfig.dtype = "float32"',
    "ModelConfig.dropout_rate = 0.0", "make_schedule.warmup_steps = 100")
EXPERIMENTS = {  # name -> (gin file, bindings); other names are gin/long_context/<name>.gin
    "53m_packed": ("gin/lm1b_53m.gin", _SHORT_CPU_RUN),
    "53m_full_packed": ("gin/lm1b_53m_full.gin", _SHORT_CPU_RUN),
}
DEFAULT_RUNS = (
    "full_1024:rotary", "full_1024:t5_bias", "block_local_4096:rotary",
    "block_local_4096:hier_bias", "sample_1024:rotary", "sample_1024:none",
    "sample_1024:hier_bias", "sample_1024:hier_bias_per_level", "sample_1024:hier_bias_discount",
    "fine_1024:rotary", "fine_1024:hier_bias", "fine_1024:hier_bias_discount",
    "sample_4096:rotary", "sample_4096:hier_bias", "sample_4096:hier_bias_discount",
    "fine_4096:hier_bias")
CURVE_SENTENCES = 400
_LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)))


def gin_of(experiment: str) -> tuple[str, tuple[str, ...]]:
  """(gin file, bindings) of an experiment name."""
  return EXPERIMENTS.get(experiment, (f"gin/long_context/{experiment}.gin", ()))


def parse(run: str) -> run_config.RunConfig:
  """The configurations of "experiment:position"."""
  experiment, position = run.split(":")
  gin_file, bindings = gin_of(experiment)
  cli.parse_gin([cli.resolve_gin_file(gin_file)], list(bindings) + list(POSITIONS[position]))
  return run_config.build()


def corpus_of(experiment: str) -> str:
  """The tokenizer directory (under the data root) of an experiment's corpus."""
  # the document corpus's is benchmarks.long_context's
  return "position_bias_53m_tokenizer" if experiment in EXPERIMENTS else "long_context_tokenizer"


def prepare(experiment: str) -> input_pipeline.PreparedData:
  """Tokenizer and token caches of an experiment's corpus (shared by its runs)."""
  gin_file, bindings = gin_of(experiment)
  cli.parse_gin([cli.resolve_gin_file(gin_file)], list(bindings))
  run = run_config.build()
  workdir = Workdir(paths.data_root() / corpus_of(experiment))
  return input_pipeline.prepare_data(workdir.tokenizer, run.source(), ("train", "test"),
                                     train_tokenizer=run.tokenizer)


@dataclasses.dataclass
class Result:
  """One run: curve points (tokens, ppl on the curve sentences), milestone evaluations."""
  run: str
  seed: int
  curve: list = dataclasses.field(default_factory=list)
  milestones: dict = dataclasses.field(default_factory=dict)


def train_one(run_name: str, seed: int, data, test_split, milestones: list[int], tokens: int,
              curve_points: int) -> Result:
  """Trains one run to `tokens`, evaluating `test_split` at each milestone and the end."""
  run, result = long_context.Run(parse(run_name), seed, data), Result(run_name, seed)
  curve_split = long_context.head(data.splits["test"], CURVE_SENTENCES)
  targets = sorted(set(milestones) | {tokens})
  every = max(1, tokens // run.tokens_per_step // curve_points)
  step, done_tokens, started = 0, 0, time.perf_counter()
  while targets:
    run.train(1)
    step, done_tokens = step + 1, done_tokens + run.tokens_per_step
    if step % every == 0:
      result.curve.append((done_tokens, run.evaluate(curve_split)["per_token_perplexity"]))
    while targets and done_tokens >= targets[0]:
      evaluation = run.evaluate(test_split)
      result.milestones[targets.pop(0)] = dict(evaluation, tokens=done_tokens)
      print(f"{run_name} seed {seed}: {done_tokens:,} tokens, test ppl "
            f"{evaluation['per_token_perplexity']:.2f} ({time.perf_counter() - started:.0f} s "
            "with evaluations)", flush=True)
  run.batches.close()
  return result


def _spread(values: list[float]) -> str:
  return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _tokens_below(curve: list, level: float) -> int | None:
  return next((tokens for tokens, ppl in curve if ppl < level), None)


def report(results: list[Result], unigram: float, out: str) -> str:
  """Markdown table over the runs (mean and min-max over seeds) and the plot of the curves."""
  names = list(dict.fromkeys(r.run for r in results))
  targets = sorted(results[0].milestones)
  rows = []
  for name in names:
    mine = [r for r in results if r.run == name]
    reached = [_tokens_below(r.curve, unigram / 2) for r in mine]
    rows.append([name]
                + [_spread([r.milestones[t]["per_token_perplexity"] for r in mine])
                   for t in targets]
                + [", ".join("never" if t is None else f"{t:,}" for t in reached)])
  figure, axis = plt.subplots(figsize=(9, 5.5))
  experiments = list(dict.fromkeys(name.split(":")[0] for name in names))
  for name in names:  # colour: the position choice; line style: the experiment
    experiment, position = name.split(":")
    curves = np.array([[point[1] for point in r.curve] for r in results if r.run == name])
    x = [point[0] for point in next(r for r in results if r.run == name).curve]
    color = plt.get_cmap("tab10")(list(POSITIONS).index(position))
    style = _LINE_STYLES[experiments.index(experiment) % len(_LINE_STYLES)]
    axis.plot(x, curves.mean(0), marker="o", markersize=2, label=name, color=color,
              linestyle=style)
    axis.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.15)
  axis.axhline(unigram, color="gray", linestyle=":", label="unigram")
  axis.set(xlabel="training tokens", yscale="log",
           ylabel=f"per-token perplexity (first {CURVE_SENTENCES} test sentences)")
  axis.legend(fontsize=7, ncol=2)
  figure.tight_layout()
  figure.savefig(out.replace(".md", ".png"), dpi=120)
  header = (["run"] + [f"test ppl at {t:,} tokens" for t in targets]
            + [f"tokens to curve ppl < {unigram / 2:.1f} (half the unigram), per seed"])
  return common.markdown_table(header, rows)


def write(results: list[Result], unigram: float, test_description: str, out: str) -> None:
  """The JSON record (results, unigram, test split) and the markdown report with its plot."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out.replace(".md", ".json"), "w", encoding="utf-8") as f:
    json.dump({"unigram_curve_perplexity": unigram, "test": test_description,
               "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
  seeds = sorted({r.seed for r in results})
  intro = (f"Test split: {test_description}. Seeds {seeds}; mean (min-max). Unigram "
           f"perplexity of the curve sentences (first {CURVE_SENTENCES} test sentences): "
           f"{unigram:.1f}.")
  common.write_report(out, "Position signals and the early learning curve",
                      [intro, "", report(results, unigram, out)])


def merge(paths_in: list[str], out: str) -> None:
  """Writes the report of several JSON records of the same runs (e.g. one per seed)."""
  records = []
  for path in paths_in:
    with open(path, encoding="utf-8") as f:
      records.append(json.load(f))
  results = [Result(**r) for record in records for r in record["results"]]
  for result in results:
    result.milestones = {int(k): v for k, v in result.milestones.items()}
  write(results, records[0]["unigram_curve_perplexity"], records[0]["test"], out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                      help="experiment:position pairs")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--milestones", type=int, nargs="+", default=[150_000, 300_000, 600_000])
  parser.add_argument("--tokens", type=int, default=200 * 4096)
  parser.add_argument("--curve_points", type=int, default=32)
  parser.add_argument("--test_sentences", type=int, default=0,
                      help="milestone evaluations on the first N test sentences (0: all)")
  parser.add_argument("--merge", nargs="+", metavar="JSON",
                      help="only write --out from these JSON records of earlier runs")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "position_bias.md"))
  args = parser.parse_args()
  if args.merge:
    merge(args.merge, args.out)
    return
  experiments = sorted({run.split(":")[0] for run in args.runs})
  if len({corpus_of(name) for name in experiments}) != 1:
    parser.error(f"--runs must share one corpus, got experiments {experiments}")
  for run in args.runs:
    if run.count(":") != 1 or run.split(":")[1] not in POSITIONS:
      parser.error(f"--runs {run!r}: expected experiment:position, position one of "
                   f"{sorted(POSITIONS)}")
  data = prepare(experiments[0])
  test_split, description = data.splits["test"], data.descriptions["test"]
  if args.test_sentences:
    test_split = long_context.head(test_split, args.test_sentences)
    description += f", its first {args.test_sentences} sentences"
  unigram = evaluate.unigram_test_perplexity(
      data.splits["train"], long_context.head(data.splits["test"], CURVE_SENTENCES),
      data.tokenizer.vocab_size)
  results = [train_one(run, seed, data, test_split, args.milestones, args.tokens,
                       args.curve_points)
             for seed in args.seeds for run in args.runs]
  write(results, unigram, description, args.out)


if __name__ == "__main__":
  main()
