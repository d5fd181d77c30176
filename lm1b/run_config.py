"""The run configuration: the gin bindings of a run, read once into one frozen `RunConfig`.

gin is the user's interface (gin/*.gin, --gin_param); this module alone knows gin's names.
The command line parses the files (lm1b.cli.parse_gin) and calls `build()`; everything below
takes the pieces it uses as arguments. The binding names and what they fill:

  ModelConfig.*              RunConfig.model      lm1b.model_config.ModelConfig
  build_inputs.*             RunConfig.inputs     lm1b.input_pipeline.InputConfig
  train_and_evaluate.*       RunConfig.loop       lm1b.loop_config.LoopConfig
  make_schedule.*            RunConfig.schedule   arguments of lm1b.optim.make_schedule
  make_optimizer.*           RunConfig.optimizer  arguments of lm1b.optim.make_optimizer
  make_mesh.*                RunConfig.mesh       arguments of lm1b.partitioning.make_mesh
  make_source.*              RunConfig.source     arguments of lm1b.sources.make_source
  load_or_train_tokenizer.*  RunConfig.tokenizer  arguments of lm1b.tokenizer.load_or_train_tokenizer

A resumed run (and a reader of a checkpoint) compares configurations field by field
(`differences`); the loop's knobs and the mesh may change on resume.
"""

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import gin

from lm1b import flash_attention, input_pipeline, optim, partitioning, sources, tokenizer
from lm1b.errors import ConfigError
from lm1b.loop_config import LoopConfig
from lm1b.model_config import ModelConfig
from lm1b.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Arguments:
  """The keyword arguments the configuration gives one library function: every parameter
  gin may bind, defaults filled in. Calling it calls the function with them."""
  function: Callable[..., Any]
  values: Mapping[str, Any]

  def __call__(self, *args, **overrides):
    return self.function(*args, **{**self.values, **overrides})


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run is configured with; `text` is gin's text of it (config.gin)."""
  model: ModelConfig
  inputs: input_pipeline.InputConfig
  loop: LoopConfig
  schedule: Arguments
  optimizer: Arguments
  mesh: Arguments
  source: Arguments
  tokenizer: Arguments
  text: str = dataclasses.field(compare=False, repr=False)


# RunConfig field -> (gin name, configuration class or library function, parameters the
# caller passes, which gin does not bind).
_BINDINGS: dict[str, tuple[str, Callable[..., Any], tuple[str, ...]]] = {
    "model": ("ModelConfig", ModelConfig, ()),
    "inputs": ("build_inputs", input_pipeline.InputConfig, ()),
    "loop": ("train_and_evaluate", LoopConfig, ()),
    "schedule": ("make_schedule", optim.make_schedule, ("num_updates",)),
    "optimizer": ("make_optimizer", optim.make_optimizer,
                  ("num_steps", "schedule", "schedule_options")),
    "mesh": ("make_mesh", partitioning.make_mesh, ("devices",)),
    "source": ("make_source", sources.make_source, ("splits",)),
    "tokenizer": ("load_or_train_tokenizer", tokenizer.load_or_train_tokenizer,
                  ("path", "source")),
}
# Fields that may differ when a run is resumed (loop lengths, logging, device layout).
RESUMABLE = ("loop", "mesh")
# Bindings of the other parts that change how a step runs but not what it computes or stores.
RESUMABLE_BINDINGS = ("ModelConfig.remat", "ModelConfig.full_attention_kernel")


def _collector(target: Callable[..., Any], passed: tuple[str, ...]) -> Callable[..., Any]:
  """A function with `target`'s gin-bindable parameters returning the configuration class's
  instance, or the function's `Arguments` (defaults filled in)."""
  signature = inspect.signature(target)
  parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                for p in signature.parameters.values() if p.name not in passed]

  def collect(**values):
    missing = [p.name for p in parameters
               if p.default is inspect.Parameter.empty and p.name not in values]
    if missing:
      raise ConfigError(f"{missing[0]} must be bound (it has no default)", owner=target)
    if inspect.isclass(target):
      return target(**values)
    bound = inspect.Signature(parameters).bind(**values)
    bound.apply_defaults()
    return Arguments(target, dict(bound.arguments))

  collect.__signature__ = inspect.Signature(parameters)
  return collect


_COLLECTORS = {field: gin.external_configurable(_collector(target, passed), name=name)
               for field, (name, target, passed) in _BINDINGS.items()}
_NAMES = {target: name for name, target, _ in _BINDINGS.values()}


def build() -> RunConfig:
  """The RunConfig of the gin bindings parsed now (lm1b.cli.parse_gin); ConfigError for a
  missing or bad value, before anything is written."""
  parts = {}
  for field, collect in _COLLECTORS.items():
    try:
      parts[field] = collect()
    except TypeError as error:  # a binding of the wrong kind
      raise ConfigError(f"{_BINDINGS[field][0]}: {error}") from None
  config = RunConfig(**parts, text=gin.config_str())
  rows = flash_attention.ROW_MULTIPLE
  if config.model.full_attention_kernel == "flash" and config.inputs.seq_len % rows:
    raise ConfigError(f"ModelConfig.full_attention_kernel='flash' needs rows of a multiple of "
                      f"{rows} positions, got build_inputs.seq_len={config.inputs.seq_len}")
  if config.model.max_len < config.inputs.seq_len:
    raise ConfigError(f"ModelConfig.max_len={config.model.max_len} is shorter than the rows' "
                      f"build_inputs.seq_len={config.inputs.seq_len}")
  return config


def from_text(text: str, where: str) -> RunConfig:
  """The RunConfig of a saved configuration text (config.gin, a checkpoint's copy); the gin
  bindings parsed now are restored afterwards. ConfigError naming `where` if unreadable."""
  current = gin.config_str()
  with gin.unlock_config():
    try:
      gin.clear_config()
      gin.parse_config(text)
      return build()
    except (ValueError, SyntaxError, TypeError, KeyError) as error:
      raise ConfigError(f"the configuration in {where} cannot be read: "
                        f"{' '.join(str(error).split())}") from None
    finally:
      gin.clear_config()
      gin.parse_config(current)


def _values(part: Any) -> Mapping[str, Any]:
  if isinstance(part, Arguments):
    return part.values
  return {field.name: getattr(part, field.name) for field in dataclasses.fields(part)}


def differences(old: RunConfig, new: RunConfig) -> list[str]:
  """The gin bindings whose values differ between two configurations, except those that may
  change on resume (RESUMABLE, RESUMABLE_BINDINGS), sorted."""
  changed = []
  for field, (name, _, _) in _BINDINGS.items():
    if field in RESUMABLE:
      continue
    before, after = _values(getattr(old, field)), _values(getattr(new, field))
    changed += [f"{name}.{key}" for key in set(before) | set(after)
                if before.get(key) != after.get(key)
                and f"{name}.{key}" not in RESUMABLE_BINDINGS]
  return sorted(changed)


def describe_error(error: BaseException) -> str:
  """The message of `error`, its first argument named by gin binding when the error says
  which configuration it is about (ConfigError.owner)."""
  owner = getattr(error, "owner", None)
  return f"{_NAMES[owner]}.{error}" if owner in _NAMES else str(error)


def check_resume(workdir: Workdir, config: RunConfig) -> None:
  """ConfigError (before anything is written) if the workdir's config.gin is from a run with
  other model, data or optimizer settings."""
  old_text = workdir.read_config()
  if old_text is None:
    return
  changed = differences(from_text(old_text, str(workdir.config)), config)
  if changed:
    raise ConfigError(f"{workdir.config} is from a run with a different configuration "
                      f"(differs in {', '.join(changed)}); use a new --workdir or the same "
                      "settings")


def differences_from_checkpoint(workdir: Workdir, checkpoint: str, saved_config: str,
                                saved_tokenizer: str | None,
                                tokenizer_digest: str) -> list[str]:
  """What of the workdir's config.gin and tokenizer differs from the checkpoint's
  checksummed copies (one phrase each; empty when they agree).

  saved_config: the checkpoint's config text; saved_tokenizer: its sha256 of the tokenizer
  model (None for checkpoints that predate it: not compared); tokenizer_digest: the sha256 of
  the workdir's tokenizer model. Fields that may change on resume are not compared.
  """
  problems = []
  current = workdir.read_config()
  changed = (["config.gin missing"] if current is None else differences(
      from_text(saved_config, f"checkpoint {checkpoint}"),
      from_text(current, str(workdir.config))))
  if changed:
    problems.append(f"{workdir.config} differs from the copy in checkpoint {checkpoint} "
                    f"(in {', '.join(changed)})")
  if saved_tokenizer is not None and saved_tokenizer != tokenizer_digest:
    problems.append(f"{workdir.tokenizer} differs from the one checkpoint {checkpoint} was "
                    f"trained with (sha256 {tokenizer_digest[:12]}..., recorded "
                    f"{saved_tokenizer[:12]}...)")
  return problems
