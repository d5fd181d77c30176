"""Generate text: python sample.py --workdir DIR --prompt TEXT [--num_samples N] ..."""

import sys

from lm1b import cli

if __name__ == "__main__":
  sys.exit(cli.sample_main())
