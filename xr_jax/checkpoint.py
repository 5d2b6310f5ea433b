"""Orbax checkpoints of a training run: train state, data-iterator position and the resolved config.

One `CheckpointManager` directory, one sub-directory per step, each with three items: `state` (the
sharded TrainState: params, optimizer state, step, RNG), `data` (the iterator's JSON state) and
`config` (the resolved config dict). Orbax writes each step to a temporary directory and renames it
when complete, so a save killed half-way is never taken for a checkpoint. Restoring reads the state
straight into the shardings of the *current* mesh, whatever mesh wrote it. A checkpoint that fails to
restore (corrupt files) is reported and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from xr_jax.errors import UserError

log = logging.getLogger("xr_jax.checkpoint")


class CheckpointError(UserError):
    pass


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Optional[dict]
    config: Optional[dict]


class Checkpointer:
    """Save every `every` steps (and when forced: end of run, preemption), keep the last `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, every: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, data_state: Optional[dict], config: Optional[dict], force: bool = False) -> bool:
        """Save if `step` is on the cadence or `force`; returns whether a save was started.

        With async saving the device arrays are copied to host before this returns, so the caller may
        donate/overwrite the state right away; the files are written in the background.
        """
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config or {}),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, abstract_state, step: Optional[int] = None) -> Optional[Restored]:
        """Restore `step` (default: the newest readable one) onto the shardings in `abstract_state`.

        Returns None when the directory has no checkpoint. A checkpoint that cannot be read is skipped
        with a warning naming it, and the next older one is tried.
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        errors = []
        for s in steps:
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            )
            try:
                out = self._manager.restore(s, args=args)
            except Exception as e:  # noqa: BLE001 — any failure to read means "not usable"
                msg = f"checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: {str(e)[:200]})"
                errors.append(msg)
                log.warning("%s; falling back to the previous checkpoint", msg)
                continue
            if errors:
                log.warning("restored checkpoint step %d after skipping %d unreadable one(s)", s, len(errors))
            return Restored(step=s, state=out.state, data_state=out.data or None, config=out.config or None)
        if errors:
            raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
        return None

    def wait(self) -> None:
        """Block until background writes are finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
