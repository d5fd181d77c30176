"""Command lines of the top-level train.py, eval.py and sample.py.

Each entry point parses its flags, parses the gin configuration once into a RunConfig
(lm1b.run_config) and calls one library function with it.
Exit codes: 0 success (also a run stopped by SIGTERM/SIGINT with a complete checkpoint),
1 a failed run (non-finite loss, unreadable data or checkpoints), 2 bad flags, gin bindings or
configuration values (nothing is written to the workdir in that case), 128 + the signal number
for a run stopped by a signal before any checkpoint existed, 3 a multi-process run that lost a
peer process (`supervisor`). Expected failures print one line (`--verbose` adds the traceback).

Configuration:
  train.py   --gin_file (repeatable, default gin/tiny.gin) and --gin_param (repeatable).
  eval.py    read the configuration from one place: WORKDIR/config.gin, saved when training
  sample.py  started, so that the same model is rebuilt; --gin_param adds or overrides
             bindings. The checkpoint's checksummed copy of the configuration is not a second
             source but the reference: config.gin must agree with it (fields that may change on
             resume aside) or the reader refuses, unless --accept_mismatch. config.gin is the
             source because it is the file a user reads and edits, and the one --gin_param
             overrides (another batch mode, an overlap) apply to.

Multi-host (e.g. a Cloud TPU pod slice): pass --multihost, or set JAX_COORDINATOR_ADDRESS
(with JAX_NUM_PROCESSES and JAX_PROCESS_ID), and `jax.distributed.initialize()` is called
before anything touches a device; on TPU it finds the coordinator from the environment.
"""

import argparse
import importlib.util  # noqa: F401  gin needs it to report a missing file properly
import logging
import os
import pathlib
import signal
import sys
import traceback
from typing import Callable, Sequence

import gin
import jax
from etils import epath

from lm1b import (checkpoints, distributed, evaluate, native_output, paths, run_config,
                  sampling, sources, storage, supervisor, train)
from lm1b.errors import ConfigError
from lm1b.train_metrics import NonFiniteLossError
from lm1b.workdir import Workdir
from lm1b.workdir_lock import WorkdirLockedError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_GIN_FILE = "gin/tiny.gin"
EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1


def resolve_gin_file(name: str) -> str:
  """Returns `name` if it exists, else the same relative path under the repository root."""
  path = pathlib.Path(name).expanduser()
  if path.is_file() or path.is_absolute():
    return str(path)
  candidate = REPO_ROOT / path
  return str(candidate) if candidate.is_file() else str(path)


def _one_line(error: BaseException) -> str:
  """The message on one line: a configuration error names its gin binding; gin's location
  lines are joined with ' | '."""
  lines = [line.strip() for line in run_config.describe_error(error).splitlines()
           if line.strip() and not line.strip().startswith("In call to configurable")]
  return " | ".join(lines) or type(error).__name__


def _open_remote(path: str):
  return epath.Path(path).open()


def _is_remote_file(path: str) -> bool:
  return storage.is_remote(path) and epath.Path(path).is_file()


# gin reads local files with open(); a workdir's config.gin may be on gs:// (eval, sample).
gin.config.register_file_reader(_open_remote, _is_remote_file)


def parse_gin(files: Sequence[str], params: Sequence[str]) -> None:
  """Clears gin and parses `files` (local or gs://) then `params`; raises ConfigError with
  gin's message.

  Includes inside gin files are looked up in the working directory, the repository root and
  its gin/ directory.
  """
  gin.clear_config()
  for search_path in (str(REPO_ROOT), str(REPO_ROOT / "gin")):
    gin.add_config_file_search_path(search_path)
  for name in files:
    if not epath.Path(name).is_file():
      raise ConfigError(f"gin file not found: {name}")
  try:
    gin.parse_config_files_and_bindings(list(files), list(params))
  except (ValueError, SyntaxError, OSError, TypeError, ImportError, KeyError) as error:
    raise ConfigError(f"gin configuration error: {_one_line(error)}") from error


def _add_reader_flags(parser: argparse.ArgumentParser) -> None:
  """Flags shared by eval.py and sample.py."""
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: latest readable)")
  parser.add_argument("--accept_mismatch", action="store_true",
                      help="use WORKDIR/config.gin and tokenizer.model even where they differ "
                           "from the checkpoint's checksummed copies")


def _common_parser(description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workdir", default="./workdir",
                      help="run directory (config.gin, tokenizer, checkpoints, tensorboard)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding such as 'ModelConfig.num_layers = 4' (repeatable)")
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() (multi-host TPU/GPU)")
  parser.add_argument("--log_level", default="INFO", help="Python logging level")
  parser.add_argument("--verbose", action="store_true",
                      help="print the traceback of an expected failure too")
  parser.add_argument("--compilation_cache", default=None,
                      help="persistent XLA compilation cache directory (default: "
                           "<data root>/jax_cache; 'none' disables it)")
  return parser


def enable_compilation_cache(directory: str | None) -> None:
  """Keeps compiled XLA programs in `directory` so reruns (resume, eval, sample) start fast.

  None means <data root>/jax_cache (see lm1b.paths); "none" or "" disables the cache.
  JAX_COMPILATION_CACHE_DIR in the environment takes precedence.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  if directory is None:
    directory = str(paths.data_root() / "jax_cache")
  if directory.lower() in ("", "none"):
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def configure_logging(level: str) -> None:
  """Root logger at `level`, one stderr handler with timestamps.

  absl's first log call (orbax logs at import) already ran logging.basicConfig(), which made
  our basicConfig a no-op: plain stderr StreamHandlers are replaced, other handlers (pytest's
  log capture) are kept.
  """
  root = logging.getLogger()
  for handler in list(root.handlers):
    if type(handler) is logging.StreamHandler:  # pylint: disable=unidiomatic-typecheck
      root.removeHandler(handler)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root.addHandler(handler)
  root.setLevel(getattr(logging, str(level).upper(), logging.INFO))


def _setup(args: argparse.Namespace, *, devices: bool = True) -> None:
  """Logging, and unless devices=False the distributed runtime and the compilation cache."""
  multiprocess = devices and _multiprocess(args)
  if supervisor.is_child():
    native_output.divert(supervisor.native_log_path())  # before the log handler takes stderr
  configure_logging(args.log_level)
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if args.verbose:  # Orbax's own records too (lm1b.checkpoints filters them otherwise)
    logging.getLogger("lm1b.checkpoints").setLevel(logging.DEBUG)
  if not devices:
    return
  if multiprocess:
    distributed.initialize(Workdir(args.workdir).checkpoints)
  enable_compilation_cache(args.compilation_cache)


def _workdir_config(workdir: Workdir) -> str:
  """The path of WORKDIR/config.gin (local or gs://); ConfigError naming it if missing."""
  storage.check_location(str(workdir), "--workdir")
  if not workdir.config.is_file():
    raise ConfigError(f"{workdir.config} not found: is --workdir a training run directory?")
  workdir.read_config()  # names the file if it is not UTF-8 or truncated
  return str(workdir.config)


def _check_output_dir(path: str | None) -> None:
  """Raises ConfigError unless `path` is None, a gs:// object in a reachable bucket, or names
  a file in an existing local directory."""
  if path is None:
    return
  storage.check_location(path, "--output")
  if storage.is_remote(path):
    return  # an object store has no directories to check
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ConfigError(f"--output {path}: directory {directory} does not exist")
  if os.path.isdir(path):
    raise ConfigError(f"--output {path} is a directory, not a file path")


# Expected failures: one line on stderr (the traceback only with --verbose).
_EXIT_CODES = (
    (ConfigError, EXIT_CONFIG_ERROR),
    (ImportError, EXIT_CONFIG_ERROR),  # a missing optional dependency: the line names it
    (checkpoints.CheckpointMismatchError, EXIT_CONFIG_ERROR),  # another model's checkpoints
    (sources.DataUnavailableError, EXIT_FAILURE),
    (WorkdirLockedError, EXIT_FAILURE),
    (NonFiniteLossError, EXIT_FAILURE),
    (checkpoints.CheckpointError, EXIT_FAILURE),
    (FileNotFoundError, EXIT_FAILURE),
    (ValueError, EXIT_FAILURE),
    (OSError, EXIT_FAILURE),
)


def _multiprocess(args: argparse.Namespace) -> bool:
  return args.multihost or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _run(function: Callable[[], int | None], args: argparse.Namespace) -> int:
  """Calls `function`, turning the project's expected failures into exit codes.

  A multi-process run (without --verbose) runs in a child process whose parent reports a lost
  peer in one line (`supervisor`).
  """
  verbose = args.verbose
  if (_multiprocess(args) and not verbose and not supervisor.is_child()
      and not getattr(args, "prepare_only", False)):
    return supervisor.run_child(native_output.default_path(),
                                Workdir(args.workdir).checkpoints)
  try:
    return function() or 0
  except Exception as error:  # pylint: disable=broad-except
    distributed.exit_if_peer_lost(error, verbose)  # does not return for a lost peer
    code = next((code for error_type, code in _EXIT_CODES if isinstance(error, error_type)), None)
    if code is None:
      raise
    if verbose:
      traceback.print_exc()
    print(f"error: {_one_line(error)}", file=sys.stderr)
    return code


def _train_exit_code(result: train.TrainResult) -> int:
  """0, or 128 + the signal number for a run stopped before any checkpoint existed."""
  if result.stopped_by is None or result.checkpoint_step is not None:
    return 0
  return 128 + int(getattr(signal, result.stopped_by))


def train_main(argv: Sequence[str] | None = None) -> int:
  """`python train.py [--gin_file F]... [--gin_param P]... [--workdir DIR] [--prepare_only]`."""
  parser = _common_parser("Train a language model on LM1B (or the embedded corpus).")
  parser.add_argument("--gin_file", action="append", default=None,
                      help=f"gin config file (repeatable; default {DEFAULT_GIN_FILE})")
  parser.add_argument("--prepare_only", action="store_true",
                      help="prepare the data (tokenizer, train and test token caches) and "
                           "exit, without using an accelerator")
  args = parser.parse_args(argv)
  files = [resolve_gin_file(f) for f in (args.gin_file or [DEFAULT_GIN_FILE])]

  def run() -> int:
    parse_gin(files, args.gin_param)
    config = run_config.build()
    _setup(args, devices=not args.prepare_only)
    workdir = Workdir(args.workdir)
    if args.prepare_only:
      train.prepare_only(config, workdir)
      return 0
    return _train_exit_code(train.train_and_evaluate(config, workdir))

  return _run(run, args)


def eval_main(argv: Sequence[str] | None = None) -> int:
  """`python eval.py --workdir DIR [--step S] [--split test] [--output F] [--gin_param P]...`."""
  parser = _common_parser("Score a split with a trained checkpoint (whole split).")
  _add_reader_flags(parser)
  parser.add_argument("--split", default="test", choices=("test", "train"))
  parser.add_argument("--output", default=None,
                      help="result JSON path (default WORKDIR/eval_<split>_<step>.json); its "
                           "directory must exist")
  args = parser.parse_args(argv)

  def run():
    _check_output_dir(args.output)
    workdir = Workdir(args.workdir)
    parse_gin([_workdir_config(workdir)], args.gin_param)
    config = run_config.build()
    _setup(args)
    evaluate.evaluate_workdir(config, workdir, step=args.step, split=args.split,
                              output=args.output, accept_mismatch=args.accept_mismatch)

  return _run(run, args)


def _check_sample_flags(args: argparse.Namespace) -> None:
  """ConfigError naming the first sampling flag out of range (before anything is loaded)."""
  checks = (("--num_samples", args.num_samples, args.num_samples >= 1, ">= 1"),
            ("--max_length", args.max_length, args.max_length is None or args.max_length >= 2,
             ">= 2 (BOS and one token)"),
            ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0: greedy)"),
            ("--top_k", args.top_k, args.top_k >= 0, ">= 0 (0: no limit)"),
            ("--top_p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"))
  for flag, value, ok, wanted in checks:
    if not ok:
      raise ConfigError(f"{flag} {value} must be {wanted}")


def sample_main(argv: Sequence[str] | None = None) -> int:
  """`python sample.py --workdir DIR --prompt TEXT [--prompt ...] [--num_samples N] ...`."""
  parser = _common_parser("Generate text from a trained checkpoint.")
  parser.add_argument("--prompt", action="append", default=None,
                      help="prompt text (repeatable; default 'the')")
  parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
  parser.add_argument("--max_length", type=int, default=None,
                      help="tokens per sample, BOS and prompt included (default and maximum: "
                           "the model's max_len)")
  parser.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 disables top-k")
  parser.add_argument("--top_p", type=float, default=1.0, help="1.0 disables nucleus")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
  _add_reader_flags(parser)
  args = parser.parse_args(argv)

  def run():
    _check_sample_flags(args)
    workdir = Workdir(args.workdir)
    parse_gin([_workdir_config(workdir)], args.gin_param)
    config = run_config.build()
    _setup(args)
    prompts = args.prompt or ["the"]
    step, texts = sampling.sample_workdir(
        config, workdir, prompts, step=args.step, seed=args.seed, num_samples=args.num_samples,
        max_length=args.max_length, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, accept_mismatch=args.accept_mismatch)
    print(f"# step {step}, seed {args.seed}", flush=True)
    for index, text in enumerate(texts):
      print(f"[{prompts[index // args.num_samples]}] {text}", flush=True)

  return _run(run, args)
