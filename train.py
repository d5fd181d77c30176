"""Train a language model: python train.py [--gin_file F] [--gin_param P] [--workdir DIR]."""

import sys

from lm1b import cli

if __name__ == "__main__":
  sys.exit(cli.train_main())
