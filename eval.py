"""Evaluate a checkpoint: python eval.py --workdir DIR [--step S] [--split test] [--output F]."""

import sys

from lm1b import cli

if __name__ == "__main__":
  sys.exit(cli.eval_main())
