"""Quality ablation on the embedded corpus: the same tiny model and budget, five attentions.

Each variant trains with gin/tiny.gin plus its own bindings, the same seed, steps and batches
(python train.py in a subprocess), then the whole test split is scored. The causal "mean"
model is scored a second time with "sample" queries: the gap is what it gained from seeing
later tokens of its own cell. Writes a table and a learning-curve plot.

  python -m benchmarks.ablation [--steps 800] [--seeds 0] [--root /tmp/hlm1b_ablation]
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

from benchmarks import common

VARIANTS = {
    "full attention": ['ModelConfig.attention = "full"'],
    'hierarchical "sample"': ['ModelConfig.query_mode = "sample"'],
    'hierarchical "fine"': ['ModelConfig.query_mode = "fine"'],
    "level 0 only (block-local)": ["ModelConfig.num_levels = 1"],
    'hierarchical causal "mean" (leaks)': ['ModelConfig.query_mode = "mean"'],
}
MEAN = 'hierarchical causal "mean" (leaks)'


def run(args: list[str]) -> None:
  """Runs a repository script, failing loudly."""
  print("$ " + " ".join(args), flush=True)
  subprocess.run([sys.executable] + args, cwd=common.REPO_DIR, check=True)


def workdir_name(variant: str, seed: int) -> str:
  slug = "".join(c if c.isalnum() else "_" for c in variant).strip("_")
  return f"{slug}_seed{seed}"


def train_variant(root: str, variant: str, seed: int, steps: int, eval_every: int) -> str:
  """Trains one variant into root/<variant>_seed<seed> and returns the workdir."""
  workdir = os.path.join(root, workdir_name(variant, seed))
  shared_tokenizer = os.path.join(root, "tokenizer.model")
  if os.path.exists(shared_tokenizer) and not os.path.exists(workdir):
    os.makedirs(workdir)
    shutil.copy(shared_tokenizer, workdir)  # identical tokenizer, trained once
  bindings = VARIANTS[variant] + [
      f"train_and_evaluate.num_steps = {steps}", f"train_and_evaluate.seed = {seed}",
      f"build_inputs.seed = {seed}", f"train_and_evaluate.eval_every = {eval_every}",
      "train_and_evaluate.sample_every = 0"]
  run(["train.py", "--workdir", workdir] + [a for b in bindings for a in ("--gin_param", b)])
  if not os.path.exists(shared_tokenizer):
    shutil.copy(os.path.join(workdir, "tokenizer.model"), shared_tokenizer)
  return workdir


def final_eval(workdir: str) -> dict:
  """The last eval_test_<step>.json written in workdir."""
  paths = sorted(glob.glob(os.path.join(workdir, "eval_test_*.json")), key=os.path.getmtime)
  with open(paths[-1], encoding="utf-8") as handle:
    return json.load(handle)


def eval_with_sample_queries(workdir: str) -> dict:
  """Scores the whole test split with the workdir's weights but "sample" queries."""
  own = final_eval(workdir)
  out = os.path.join(workdir, "eval_with_sample_queries.json")
  run(["eval.py", "--workdir", workdir, "--output", out,
       "--gin_param", 'ModelConfig.query_mode = "sample"'])
  with open(out, encoding="utf-8") as handle:
    result = json.load(handle)
  assert result["step"] == own["step"], (result["step"], own["step"])
  return result


def learning_curve(workdir: str) -> tuple[list[int], list[float]]:
  """(steps, eval per-token perplexity) read back from the run's TensorBoard files."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  accumulator.Reload()
  events = accumulator.Scalars("eval/per_token_perplexity")
  return [e.step for e in events], [e.value for e in events]


def plot(curves: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axis = plt.subplots(figsize=(7, 4.5))
  for label, (steps, values) in curves.items():
    axis.plot(steps, values, marker="o", label=label)
  axis.set_xlabel("training step")
  axis.set_ylabel("held-out per-token perplexity")
  axis.set_yscale("log")
  axis.grid(True, which="both", alpha=0.3)
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  print(f"wrote {path}")


def mean_and_spread(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{sum(values) / len(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--root", default="/tmp/hlm1b_ablation", help="workdirs go here")
  parser.add_argument("--out", default=common.RESULTS_DIR)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results, curves = {}, {}
  for variant in VARIANTS:
    for seed in args.seeds:
      workdir = train_variant(args.root, variant, seed, args.steps, args.eval_every)
      results.setdefault(variant, []).append(final_eval(workdir))
      if seed == args.seeds[0]:
        curves[variant] = learning_curve(workdir)
      if variant == MEAN:
        results.setdefault("mean weights, sample queries", []).append(
            eval_with_sample_queries(workdir))
  rows = [[name, mean_and_spread([r["per_token_perplexity"] for r in runs]),
           mean_and_spread([r["per_word_perplexity"] for r in runs]), runs[0]["tokens"]]
          for name, runs in results.items()]
  table = common.markdown_table(
      ["attention", "test per-token ppl", "test per-word ppl", "test tokens"], rows)
  seeds = ", ".join(str(s) for s in args.seeds)
  note = (f"gin/tiny.gin, {args.steps} steps, seeds {seeds} (value: mean, and min-max when "
          "several seeds), whole held-out test split (heldout shard 00000 of the embedded "
          "corpus). 'mean weights, sample queries' re-scores the causal \"mean\" model with "
          "strictly causal \"sample\" queries.")
  plot(curves, os.path.join(args.out, "ablation.png"))
  common.write_report(os.path.join(args.out, "ablation.md"), "Quality ablation (embedded corpus)",
                      [note, "", table, "", "![learning curves](ablation.png)"])


if __name__ == "__main__":
  main()
