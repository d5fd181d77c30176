"""Orbax checkpoints of the training state, the data-iterator state and the gin config.

Each step directory holds three items of one `orbax.checkpoint.CheckpointManager`:

  state   the training-state PyTree (params, opt_state, step, rng as raw uint32 key data),
          saved with StandardSave and restored onto the shardings of an abstract state;
  data    the data-iterator state dict (JSON);
  config  {"gin": operative gin config text} (JSON).

Saves are asynchronous by default; orbax writes into a temporary directory and renames it
when complete, so an interrupted save never shows up as a step. A finalised step that is
later damaged (truncated or missing files) is detected at restore time, and
`restore_latest_valid` falls back to the previous step.
"""

import logging
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_LOG = logging.getLogger(__name__)
ARRAY_ITEMS = ("params", "opt_state", "train")
_ITEMS = ARRAY_ITEMS + ("data", "config")


class CheckpointError(Exception):
  """A checkpoint that cannot be used; the message is one line naming it."""


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns: the restored array items by name."""
  items: dict
  data_state: dict
  config_text: str
  step: int


def _brief(error: BaseException, limit: int = 160) -> str:
  """One short line describing an exception (orbax/tensorstore messages can be huge)."""
  text = " ".join(str(error).split())
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}"


def _plain(data_state: dict) -> dict:
  """Copy with numpy scalars turned into Python numbers (JSON-serialisable)."""
  return {str(k): v.item() if hasattr(v, "item") else v for k, v in data_state.items()}


def _is_chief() -> bool:
  return jax.process_index() == 0


class Checkpointer:
  """Saves and restores training checkpoints under `directory` (one sub-dir per step).

  Every method must be called on every process (orbax synchronises the hosts).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
               save_every: int = 1000, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"Checkpointer keep={keep} must be >= 1")
    if save_every < 1:
      raise ValueError(f"Checkpointer save_every={save_every} must be >= 1")
    self.directory = os.fspath(os.path.abspath(directory))
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=_ITEMS)

  def should_save(self, step: int) -> bool:
    """True on positive multiples of `save_every` not saved yet."""
    return step > 0 and step % self.save_every == 0 and step not in self.all_steps()

  def save(self, step: int, items: dict, data_state: dict, config_text: str,
           force: bool = False) -> bool:
    """Starts saving `step` if `should_save(step)` or `force`; returns whether it did.

    items: {name: PyTree of jax/numpy arrays} for the names in ARRAY_ITEMS (no typed PRNG
    keys: store jax.random.key_data). data_state: JSON-serialisable dict. A step that already
    exists is never rewritten.
    """
    if step in self.all_steps() or not (force or self.should_save(step)):
      return False
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
        data=ocp.args.JsonSave(_plain(data_state)),
        config=ocp.args.JsonSave({"gin": config_text}),
    )
    return bool(self._manager.save(step, args=args, force=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, abstract_items: dict, step: int | None = None) -> Restored:
    """Restores the given items of `step` (default: latest) onto their abstract shardings.

    abstract_items: {name: PyTree of jax.ShapeDtypeStruct (with .sharding)}, a subset of the
    saved array items (e.g. only "params").
    Raises FileNotFoundError when there is no such step, and whatever orbax raises when the
    step's files are unreadable.
    """
    self.wait()
    if step is None:
      step = self.latest_step()
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(
          f"no checkpoint step {step} in {self.directory} (have {self.all_steps()})")
    args = ocp.args.Composite(
        **{name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()},
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
    )
    restored = self._manager.restore(step, args=args)
    config = restored["config"]
    if not isinstance(config, dict) or "gin" not in config:
      raise ValueError(f"checkpoint {self.step_path(step)} has no gin config text")
    items = {name: restored[name] for name in abstract_items}
    return Restored(items, dict(restored["data"]), config["gin"], step)

  def restore_latest_valid(self, abstract_items: dict) -> Restored | None:
    """Restores the newest readable step, or None if there is no checkpoint at all.

    An unreadable step is reported with one error line naming its directory and the next
    older step is tried; if every step fails, the last error is raised.
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      return None
    for position, step in enumerate(reversed(steps)):
      try:
        return self.restore(abstract_items, step)
      except Exception as error:  # pylint: disable=broad-except
        if position == len(steps) - 1:
          raise ValueError(
              f"all checkpoints in {self.directory} are unreadable (steps {steps}); "
              f"oldest {self.step_path(step)} failed with {type(error).__name__}: {error}"
          ) from error
        if _is_chief():
          _LOG.error("checkpoint %s is corrupt or incomplete (%s); falling back to an "
                     "older step", self.step_path(step), _brief(error))
    return None  # unreachable

  restore_latest = restore_latest_valid

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
