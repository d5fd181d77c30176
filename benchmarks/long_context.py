"""Equal compute on the document corpus: long context with hierarchical attention vs full.

Trains the gin/long_context/ experiments (tiny width, stream rows of the document corpus,
4096 tokens per step) with the pipeline's own pieces (batches, train step, evaluator) and
reports the test split's per-token perplexity (stream windows of each model's own length, every
test token scored once):

* at equal training tokens: after `--tokens` tokens;
* at equal training time: after `--seconds` seconds of training steps (evaluation excluded;
  default: the shortest time any configuration needs for `--tokens`, estimated from timed
  steps before the runs, so that every run passes it);

for every configuration and seed, with learning curves (a fixed first part of the test split,
against training time) plotted to benchmarks/results/long_context.png. Runs go one after the
other on all the machine's cores; each run trains until it has passed both budgets.

  python -m benchmarks.long_context [--configs full_256 sample_4096 ...] [--seeds 0 1]
      [--tokens 1228800] [--seconds S] [--curve_points 8] [--gin_param BINDING ...]
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from lm1b import (batches, cli, evaluate, experiment, input_pipeline,  # noqa: E402
                  partitioning, paths, run_config, steps)
from lm1b.prefetch import Prefetcher  # noqa: E402
from lm1b.token_cache import TokenizedSplit  # noqa: E402
from lm1b.workdir import Workdir  # noqa: E402

CONFIGS = ("full_64", "full_256", "full_1024", "sample_1024", "sample_4096", "fine_1024",
           "fine_4096", "block_local_4096")
CURVE_SENTENCES = 400  # the test sentences scored for the learning curves


GIN_PARAMS: list[str] = []  # --gin_param bindings applied to every configuration


def parse(name: str) -> run_config.RunConfig:
  cli.parse_gin([cli.resolve_gin_file(f"gin/long_context/{name}.gin")], GIN_PARAMS)
  return run_config.build()


def head(split: TokenizedSplit, sentences: int) -> TokenizedSplit:
  """The first `sentences` sentences of a split."""
  end = int(split.offsets[sentences])
  return TokenizedSplit(split.tokens[:end], split.offsets[:sentences + 1],
                        split.words[:sentences])


@dataclasses.dataclass
class Result:
  """One run: curve points (seconds, tokens, curve ppl) and the two full evaluations."""
  config: str
  seed: int
  tokens_per_second: float = 0.0
  curve: list = dataclasses.field(default_factory=list)
  at_tokens: dict | None = None
  at_seconds: dict | None = None


class Run:
  """A configuration's model, state, train step, batches (rows as `inputs.mode` says) and
  evaluator."""

  def __init__(self, run: run_config.RunConfig, seed: int, data: input_pipeline.PreparedData):
    self.inputs = run.inputs
    config = experiment.with_vocab(run.model, data.tokenizer.vocab_size)
    self.mesh = run.mesh()
    optimizer = run.optimizer(10**9, schedule_options=run.schedule.values)
    spec = experiment.make_state_spec(config, optimizer, self.mesh)
    self.state = experiment.init_state(spec, seed)
    self.step = steps.make_train_step(spec, label_smoothing=0.0)
    self.evaluator = evaluate.Evaluator(config, self.mesh, spec.shardings.params)
    self.tokens_per_step = self.inputs.global_batch * self.inputs.seq_len
    self.data = data
    sharding = partitioning.batch_sharding(self.mesh)
    self.slot = experiment.packing_slot_for(config)
    rows = batches.TrainBatches(data.splits["train"], global_batch=self.inputs.global_batch,
                                seq_len=self.inputs.seq_len, mode=self.inputs.mode, seed=seed,
                                slot=self.slot)
    self.batches = Prefetcher(batches.to_global_arrays(b, sharding) for b in rows)

  def train(self, count: int) -> float:
    """Runs `count` steps; returns their wall seconds (blocked on the last)."""
    start = time.perf_counter()
    for _ in range(count):
      self.state, metrics = self.step(self.state, next(self.batches))
    jax.block_until_ready(metrics["loss_sum"])
    return time.perf_counter() - start

  def evaluate(self, split: TokenizedSplit) -> dict:
    return self.evaluator.run(self.state.params, batches.eval_batches(
        split, global_batch=self.inputs.eval_batch, seq_len=self.inputs.seq_len,
        mode=self.inputs.mode, slot=self.slot, overlap=self.inputs.eval_overlap))


def prepare() -> input_pipeline.PreparedData:
  """Tokenizer (trained once, shared by every configuration) and token caches."""
  run = parse(CONFIGS[0])
  workdir = Workdir(paths.data_root() / "long_context_tokenizer")
  return input_pipeline.prepare_data(workdir.tokenizer, run.source(), ("train", "test"),
                                     train_tokenizer=run.tokenizer)


def estimate_seconds(name: str, data, tokens: int, steps_timed: int = 10) -> float:
  """Training seconds `name` needs for `tokens`, from a few timed steps after compiling."""
  run = Run(parse(name), 0, data)
  run.train(2)
  seconds = run.train(steps_timed) / steps_timed
  run.batches.close()
  return seconds * tokens / run.tokens_per_step


def train_one(name: str, seed: int, data, tokens: int, seconds: float,
              curve_points: int) -> Result:
  """Trains one configuration until it has passed both budgets (see the module docstring).

  The first step's time (compilation) is not counted; its tokens are.
  """
  run, result = Run(parse(name), seed, data), Result(name, seed)
  curve_split = head(data.splits["test"], CURVE_SENTENCES)
  run.train(1)
  step, done_tokens, done_seconds = 1, run.tokens_per_step, 0.0
  every = max(1, tokens // run.tokens_per_step // curve_points)
  while done_tokens < tokens or done_seconds < seconds:
    done_seconds += run.train(1)
    step, done_tokens = step + 1, done_tokens + run.tokens_per_step
    if step % every == 0:
      ppl = run.evaluate(curve_split)["per_token_perplexity"]
      result.curve.append((done_seconds, done_tokens, ppl))
      print(f"{name} seed {seed}: {done_tokens:,} tokens, {done_seconds:.0f} s, curve ppl "
            f"{ppl:.2f}", flush=True)
    if result.at_tokens is None and done_tokens >= tokens:
      result.at_tokens = dict(run.evaluate(data.splits["test"]), seconds=done_seconds)
    if result.at_seconds is None and done_seconds >= seconds:
      result.at_seconds = dict(run.evaluate(data.splits["test"]), tokens=done_tokens)
  result.tokens_per_second = done_tokens / done_seconds
  run.batches.close()
  return result


def _spread(values: list[float]) -> str:
  return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(results: list[Result], tokens: int, seconds: float, out: str) -> list[str]:
  """Markdown table (mean and min-max over seeds) and the plot of curves against time."""
  rows = []
  for name in dict.fromkeys(r.config for r in results):
    mine = [r for r in results if r.config == name]
    rows.append([name, f"{statistics.mean(r.tokens_per_second for r in mine):,.0f}",
                 _spread([r.at_tokens["per_token_perplexity"] for r in mine]),
                 f"{statistics.mean(r.at_tokens['seconds'] for r in mine):.0f}",
                 _spread([r.at_seconds["per_token_perplexity"] for r in mine]),
                 f"{statistics.mean(r.at_seconds['tokens'] for r in mine):,.0f}"])
  figure, axis = plt.subplots(figsize=(8, 5))
  for name in dict.fromkeys(r.config for r in results):
    mine = [r for r in results if r.config == name]
    points = min(len(r.curve) for r in mine)
    x = np.mean([[c[0] for c in r.curve[:points]] for r in mine], axis=0)
    y = np.array([[c[2] for c in r.curve[:points]] for r in mine])
    line, = axis.plot(x, y.mean(0), marker="o", markersize=3, label=name)
    axis.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
  axis.axvline(seconds, color="gray", linestyle=":", label="equal-time budget")
  axis.set(xlabel="training seconds (steps only)", yscale="log",
           ylabel=f"per-token perplexity (first {CURVE_SENTENCES} test sentences)",
           title="Document corpus, 4096 training tokens per step")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(out.replace(".md", ".png"), dpi=120)
  return [common.markdown_table(
      ["config", "train tokens/s", f"test ppl at {tokens:,} tokens", "seconds to get there",
       f"test ppl at {seconds:.0f} s", "tokens by then"], rows)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--tokens", type=int, default=300 * 4096)
  parser.add_argument("--seconds", type=float, default=None)
  parser.add_argument("--curve_points", type=int, default=8)
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding applied to every configuration (repeatable)")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "long_context.md"))
  args = parser.parse_args()
  GIN_PARAMS.extend(args.gin_param)
  data = prepare()
  seconds = args.seconds
  if seconds is None:
    estimates = {name: estimate_seconds(name, data, args.tokens) for name in args.configs}
    print("estimated seconds for the token budget:", json.dumps(estimates), flush=True)
    seconds = min(estimates.values())
  results = [train_one(name, seed, data, args.tokens, seconds, args.curve_points)
             for seed in args.seeds for name in args.configs]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out.replace(".md", ".json"), "w", encoding="utf-8") as f:
    json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
  bindings = f" Gin bindings for every run: {', '.join(args.gin_param)}." if args.gin_param else ""
  sections = [f"Test split: {data.descriptions['test']}, scored in stream windows of each "
              f"model's length. Seeds {args.seeds}; mean (min-max). Budgets: {args.tokens:,} "
              f"training tokens; {seconds:.0f} s of training steps.{bindings}", ""]
  common.write_report(args.out, "Long context at equal compute",
                      sections + report(results, args.tokens, seconds, args.out))


if __name__ == "__main__":
  main()
