"""Checksummed Orbax checkpoints: named array items, the data-iterator state and the config.

Each step directory is one step of an `orbax.checkpoint.CheckpointManager` and holds

  <item>...  one StandardSave item per entry of `items` (e.g. params, opt_state, train), so
             one item can be restored without reading the others (eval and sampling read
             `params` only);
  data       the data-iterator state (JSON);
  config     {"gin": operative gin config text} (JSON);
  checksums  {"arrays": {"<item>/<tree path>": 16 hex digits}, "data": sha256,
             "config": sha256, "tokenizer": sha256 of the tokenizer model, if given}
             (JSON): see lm1b.checksum.

A restore verifies the checksums of what it read, so a flipped bit or an overwritten byte
in an array file (which Orbax and TensorStore read back without complaint) is reported as
CorruptCheckpointError naming the step directory and the first array that differs.
`restore_latest_valid` falls back past damaged steps, `quarantine` moves them to
`<directory>/corrupt/` so that their step numbers can be saved again.

Saves are asynchronous by default; Orbax writes into a temporary directory and renames it
when complete, so an interrupted save never shows up as a step. `check_for_errors` notices
a failed background write at once (Orbax itself reports it at the next save).

Errors are one line (CheckpointError and subclasses). Orbax's own log records, with their
tracebacks, are kept off the console unless the `lm1b.checkpoints` logger is at DEBUG.
"""

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from lm1b import checksum
from lm1b.checkpoint_types import (
    CheckpointError, CheckpointMismatchError, CheckpointWriteError, CorruptCheckpointError,
    Damaged, NoCheckpointError, Restored, ShapeDtype, describe_damaged, listing,
    shape_problems, shapes, summarize_error)
from lm1b import layer_stack
from lm1b import orbax_quiet
from lm1b import storage
from lm1b.chief import is_chief

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatchError", "CheckpointWriteError",
           "CorruptCheckpointError", "Damaged", "NoCheckpointError", "Restored",
           "describe_damaged", "summarize_error", "CORRUPT_DIR", "RESERVED_ITEMS"]
_LOG = logging.getLogger(__name__)
_DATA, _CONFIG, _CHECKSUMS = "data", "config", "checksums"
RESERVED_ITEMS = (_DATA, _CONFIG, _CHECKSUMS)
CORRUPT_DIR = "corrupt"
_RELIST_ATTEMPTS = 3


def _plain(data_state: Mapping[str, Any]) -> dict:
  """Copy with numpy scalars turned into Python numbers (JSON-serialisable)."""
  return {str(k): v.item() if hasattr(v, "item") else v for k, v in data_state.items()}


# -- the checkpointer ----------------------------------------------------------------------------
class Checkpointer:
  """Saves and restores checkpoints under `directory` (one sub-directory per step), a local
  directory or a gs:// URL (lm1b.storage).

  Every method must be called on every process (Orbax and the checksums synchronise the
  hosts); process 0 alone logs and moves directories.

  read_only=True is for tools that read a run (eval.py, sample.py), possibly beside a running
  trainer: nothing is created, cleaned (the trainer's `*.orbax-checkpoint-tmp` directories
  stay), deleted or moved; save and quarantine refuse. A step that disappears while it is
  read (the trainer's retention deleted it) is skipped as gone, not reported as damaged.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
               save_every: int = 1000, async_save: bool = True, read_only: bool = False,
               quarantine: str | os.PathLike | None = None):
    if keep < 1:
      raise ValueError(f"Checkpointer keep={keep} must be >= 1")
    if save_every < 1:
      raise ValueError(f"Checkpointer save_every={save_every} must be >= 1")
    orbax_quiet.install()
    self.directory = storage.resolve(directory)  # local (absolute) or gs://
    self.quarantine_directory = (storage.resolve(quarantine) if quarantine is not None else
                                 str(epath.Path(self.directory) / CORRUPT_DIR))
    self.save_every = save_every
    self.read_only = read_only
    self._saving_step: int | None = None
    self._unchecked_save = False  # a save started whose outcome nobody has looked at yet
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save and not read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        # Readers list steps without reading each step's metadata: beside a trainer, a step
        # may be deleted between the listing and that read.
        lightweight_initialize=read_only,
        save_interval_steps=0 if read_only else 1,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._metadata_handler = ocp.StandardCheckpointHandler()

  # -- steps ---------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return str(epath.Path(self.directory) / str(step))

  def should_save(self, step: int) -> bool:
    """True on positive multiples of `save_every` not saved yet."""
    return step > 0 and step % self.save_every == 0 and step not in self.all_steps()

  def _existing_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None and steps:
      step = steps[-1]
    if step is None or step not in steps:
      raise NoCheckpointError(
          f"no checkpoint step {step} in {self.directory} (have {steps or 'none'})")
    return step

  # -- saving --------------------------------------------------------------------------------
  def save(self, step: int, items: Mapping[str, Any], data_state: Mapping[str, Any],
           config_text: str, *, force: bool = False,
           tokenizer_digest: str | None = None) -> bool:
    """Starts saving `step` if `should_save(step)` or `force`; returns whether it did.

    items: {name: PyTree of jax/numpy arrays}, each saved as its own Orbax item (no typed
    PRNG keys: store jax.random.key_data); names are directory names other than
    RESERVED_ITEMS. data_state: JSON-serialisable dict. tokenizer_digest: sha256 hex of
    the run's tokenizer model, kept in the checksums item. A step that exists is never
    rewritten. Raises CheckpointWriteError if this or an earlier asynchronous save failed.
    """
    self._check_writable("save")
    if step in self.all_steps() or not (force or self.should_save(step)):
      return False
    self.wait()  # Orbax would wait for the previous save too; this names its step if it failed
    for name in items:
      if name in RESERVED_ITEMS or not name.isidentifier():
        raise ValueError(f"checkpoint item name {name!r} must be an identifier other than "
                         f"{', '.join(RESERVED_ITEMS)}")
    data_state = _plain(data_state)
    record = {"arrays": checksum.tree_checksums(dict(items)),
              "data": checksum.json_digest(data_state),
              "config": checksum.text_digest(config_text)}
    if tokenizer_digest is not None:
      record["tokenizer"] = tokenizer_digest
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
        **{_DATA: ocp.args.JsonSave(data_state),
           _CONFIG: ocp.args.JsonSave({"gin": config_text}),
           _CHECKSUMS: ocp.args.JsonSave(record)})
    self._saving_step, self._unchecked_save = step, True
    try:
      return bool(self._manager.save(step, args=args, force=True))
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(error) from error

  def _check_writable(self, what: str) -> None:
    if self.read_only:
      raise CheckpointError(f"cannot {what} in {self.directory}: opened read-only")

  def _write_error(self, error: BaseException) -> CheckpointWriteError:
    self._manager.reload()
    step = self._saving_step
    return CheckpointWriteError(f"saving checkpoint step {step} to {self.step_path(step)} "
                                f"failed: {summarize_error(error)}")

  def is_saving(self) -> bool:
    """True while an asynchronous save is being written."""
    return self._manager.is_saving_in_progress()

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError if an asynchronous save has failed; never blocks on one
    that is still running (benchmarks/checkpoint.py measures the cost per call)."""
    if self._unchecked_save and not self.is_saving():
      self.wait()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk; raises CheckpointWriteError if
    one failed (once: the failed step is not listed afterwards)."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(error) from error
    finally:
      self._unchecked_save = False

  # -- reading -------------------------------------------------------------------------------
  def _saved_shapes(self, step: int, item: str) -> dict[str, ShapeDtype]:
    """{tree path: (shape, dtype)} of one saved item, from its metadata file only."""
    path = self._manager.directory / str(step) / item  # an etils.epath.Path
    if not path.is_dir():
      try:
        present = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
      except FileNotFoundError:  # the whole step went meanwhile (see _gone)
        present = []
      raise CorruptCheckpointError(self.step_path(step),
                                   f"no item {item!r} (has {', '.join(present) or 'none'})")
    try:
      metadata = self._metadata_handler.metadata(path)
    except Exception as error:  # pylint: disable=broad-except
      raise CorruptCheckpointError(self.step_path(step),
                                   f"{item} metadata: {summarize_error(error)}") from error
    return shapes(getattr(metadata, "tree", metadata))

  def check_compatible(self, abstract_items: Mapping[str, Any],
                       step: int | None = None) -> int | None:
    """Compares shapes and dtypes with a checkpoint's metadata (no array data is read).

    abstract_items: {name: PyTree of objects with .shape and .dtype}. step None: the newest
    step whose metadata can be read (damaged steps are left to restore_latest_valid);
    returns the step compared, None if no step's metadata is readable. Raises
    CheckpointMismatchError listing the differing tree paths; for an explicit step,
    CorruptCheckpointError if its metadata is unreadable and NoCheckpointError if it does
    not exist.
    """
    if step is None:
      for candidate in reversed(self.all_steps()):
        try:
          return self.check_compatible(abstract_items, candidate)
        except CorruptCheckpointError:
          continue
      return None
    step = self._existing_step(step)
    problems, saved_paths, wanted_paths = [], set(), set()
    for item, abstract in abstract_items.items():
      saved, wanted = self._saved_shapes(step, item), shapes(abstract)
      problems += shape_problems(item, saved, wanted)
      saved_paths, wanted_paths = saved_paths | set(saved), wanted_paths | set(wanted)
    if problems:
      hint = layer_stack.layout_hint(saved_paths, wanted_paths)
      raise CheckpointMismatchError(
          f"checkpoint {self.step_path(step)} does not match the configured model: "
          f"{hint + '; ' if hint else ''}{listing(problems)}")
    return step

  def restore(self, abstract_items: Mapping[str, Any], step: int | None = None) -> Restored:
    """Restores only the given items of `step` (default: latest) and verifies them.

    abstract_items: {name: PyTree of jax.ShapeDtypeStruct with .sharding}; each array is
    read onto its sharding. The items' array checksums, the data state's and the config's
    are checked. Raises NoCheckpointError, CheckpointMismatchError (shapes differ; nothing
    read), CorruptCheckpointError (naming the first array that differs).
    """
    self.wait()
    step = self._existing_step(step)
    self.check_compatible(abstract_items, step)
    args = ocp.args.Composite(
        **{name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()},
        **{name: ocp.args.JsonRestore() for name in RESERVED_ITEMS})
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as error:  # pylint: disable=broad-except
      raise CorruptCheckpointError(self.step_path(step), summarize_error(error)) from error
    items = {name: restored[name] for name in abstract_items}
    config = restored[_CONFIG]
    self._verify(step, items, restored[_DATA], config, restored[_CHECKSUMS])
    return Restored(items, dict(restored[_DATA]), config["gin"], step, [],
                    restored[_CHECKSUMS].get("tokenizer"))

  def _verify(self, step: int, items: dict, data_state: Any, config: Any, record: Any) -> None:
    """Raises CorruptCheckpointError unless everything read matches the saved checksums."""
    def damaged(reason):
      return CorruptCheckpointError(self.step_path(step), reason)
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
      raise damaged("the checksums item is unreadable")
    if not isinstance(data_state, dict) or checksum.json_digest(data_state) != record.get(
        "data"):
      raise damaged("the data-iterator state does not match its checksum")
    if not isinstance(config, dict) or not isinstance(config.get("gin"), str) or (
        checksum.text_digest(config["gin"]) != record.get("config")):
      raise damaged("the config text does not match its checksum")
    saved = record["arrays"]
    for path, digest in checksum.tree_checksums(items).items():
      if saved.get(path) != digest:
        raise damaged(f"{path} does not match its checksum (read {digest}, saved "
                      f"{saved.get(path)})")

  def restore_latest_valid(self, abstract_items: Mapping[str, Any]) -> Restored | None:
    """The newest step that restores and verifies, or None if there is no step at all.

    Whatever makes a step unreadable (array data, metadata, OCDBT manifest, the JSON items,
    a checksum mismatch) makes it damaged: it is skipped, listed in Restored.damaged and
    left in place (see `quarantine`, `describe_damaged`). Raises CorruptCheckpointError if
    every step is damaged, and CheckpointMismatchError at once if the shapes differ (a
    configuration problem).
    """
    self.wait()
    damaged, tried = [], set()
    while untried := sorted(set(self.all_steps()) - tried):
      step = untried[-1]
      tried.add(step)
      try:
        return self.restore(abstract_items, step)._replace(damaged=damaged)
      except CorruptCheckpointError as error:
        if not self._gone(step):
          damaged.append(Damaged(step, error.reason))
    if damaged:
      raise CorruptCheckpointError(
          self.directory, "every step is damaged: " + listing(
              [f"step {d.step}: {d.reason}" for d in damaged]))
    return None

  def _gone(self, step: int) -> bool:
    """Re-lists the steps (newer ones may have appeared too); True if `step` is no longer
    there: deleted while it was read, not damaged."""
    for _ in range(_RELIST_ATTEMPTS):
      try:
        self._manager.reload()
        break
      except FileNotFoundError:  # a step deleted while Orbax read its metadata: list again
        continue
    return step not in self.all_steps()

  # -- damaged steps -------------------------------------------------------------------------
  def quarantine(self, steps: Sequence[int]) -> list[str]:
    """Moves the given step directories to <quarantine directory>/<step> (never deletes;
    default quarantine directory <directory>/corrupt).

    A taken name gets a suffix (<step>.1, <step>.2, ...). Process 0 moves; afterwards every
    process sees the new step list, and the steps' numbers can be saved again. Returns the
    new paths (on process 0; empty elsewhere).
    """
    self._check_writable("move damaged steps aside")
    self.wait()
    moved = []
    if is_chief():
      for step in steps:
        source = epath.Path(self.step_path(step))
        if source.is_dir():
          moved.append(self._move_aside(source, str(step)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("lm1b.checkpoints.quarantine")
    self._manager.reload()
    return moved

  def _move_aside(self, source: epath.Path, name: str) -> str:
    corrupt = epath.Path(self.quarantine_directory)
    target, suffix = corrupt / name, 0
    while target.exists():
      suffix += 1
      target = corrupt / f"{name}.{suffix}"
    storage.move_tree(source, target)
    return str(target)

  # -- lifetime ------------------------------------------------------------------------------
  def close(self) -> None:
    """Waits for pending saves (raising CheckpointWriteError if one failed) and closes."""
    try:
      self.wait()
    finally:
      self._manager.close()
      self._metadata_handler.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
