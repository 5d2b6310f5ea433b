"""Orbax checkpoints of a training run: train state, data-iterator position and the resolved config.

One `CheckpointManager` directory, one sub-directory per step, each with three items: `state` (the
sharded TrainState: params, optimizer state, step, RNG), `data` (the iterator's JSON state) and
`config` (the resolved config dict). Orbax writes each step to a temporary directory and renames it
when complete, so a save killed half-way is never taken for a checkpoint. Restoring reads the state
straight into the shardings of the *current* mesh, whatever mesh wrote it.

The directory defends itself (docs/checkpoints.md) with `integrity`'s pieces: process 0 holds its lock;
each step's `config` item is the run's fingerprint, checked on resume; once Orbax has finalized a step, a
manifest of SHA-256 checksums is written into it, a restore verifies it first, and a step that is corrupt
(or that Orbax cannot read) is moved to `corrupt/` once an older step has been restored instead, so that
step is saved again when reached.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import inspect
import logging
import os
import sys
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from xr_jax.checkpoints.integrity import (
    CORRUPT_DIR, UNVERIFIED, CheckpointError, CheckpointLocked, ConfigChanged, DirLock, config_changes,
    describe_changes, refused_changes, short_error, verify_manifest, write_manifest,
)

log = logging.getLogger("xr_jax.checkpoints.training")


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Optional[dict]
    config: Optional[dict]
    changed: dict = dataclasses.field(default_factory=dict)  # allowed config changes: {key: (saved, now)}


# ----------------------------------------------------------------------------- Orbax noise


def _drop_failed_read_noise(unraisable) -> None:
    """When an Orbax restore fails, TensorStore reads still in flight complete into the asyncio loop that the
    failure closes (each reports `RuntimeError: Event loop is closed`), and Orbax's pending read coroutines
    are closed unawaited: hundreds of tracebacks for one bad checkpoint, printed as "unraisable" errors.
    Those two kinds are dropped; anything else goes to the previous hook."""
    e, obj = unraisable.exc_value, unraisable.object
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and obj is None:
        return
    if inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename:
        return
    _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def _quiet_failed_restores() -> None:
    """Install `_drop_failed_read_noise` (once; it must be in place before a restore can fail)."""
    global _previous_unraisablehook
    if sys.unraisablehook is not _drop_failed_read_noise:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _drop_failed_read_noise


# ----------------------------------------------------------------------------- the checkpointer


def _from_process_0(value: int) -> int:
    """Process 0's `value` on every process (a collective: all processes must call it)."""
    from xr_jax.parallel import each_process

    return int(each_process(np.int32(value))[0])


class Checkpointer:
    """Save every `every` steps (and when forced: end of run, preemption), keep the last `keep`.

    lock=True (training runs) takes the directory's lock before anything is read or written; `close()`
    releases it. Process 0 alone takes the lock, writes manifests and moves corrupt steps aside; the
    verdicts are shared with the other processes, so all of them restore the same step.
    """

    def __init__(self, directory: str, *, keep: int = 3, every: int = 1, async_save: bool = True,
                 lock: bool = False):
        self.directory = os.path.abspath(directory)
        self.every = every
        self._main = jax.process_index() == 0
        self._lock: Optional[DirLock] = None
        if lock:
            self._take_lock()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))
        self._unsealed: list[int] = []  # steps this run saved whose manifest is not written yet
        self._sealer = concurrent.futures.ThreadPoolExecutor(1) if self._main else None
        self._sealing: Optional[concurrent.futures.Future] = None

    def _take_lock(self) -> None:
        error = None
        if self._main:
            os.makedirs(self.directory, exist_ok=True)
            self._lock = DirLock(self.directory)
            try:
                self._lock.acquire()
            except CheckpointLocked as e:
                error = e
        if jax.process_count() > 1 and not _from_process_0(error is None):
            raise error or CheckpointLocked(f"checkpoint.dir {self.directory} is in use by another run "
                                            "(process 0 says by whom)")
        if error is not None:
            raise error

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -- saving

    def _write_manifests(self, steps: list[int]) -> None:
        for s in steps:
            try:
                write_manifest(self._step_dir(s))
            except FileNotFoundError:
                pass  # already rotated out by `keep`
            except OSError as e:
                log.warning("could not write the checksums of checkpoint step %d (%s); it will restore unverified",
                            s, short_error(e))

    def _seal(self, block: bool) -> None:
        """Wait for Orbax to finalize the pending save, then checksum the steps this run saved: in the
        background (the next save or `wait` joins it) unless `block`."""
        self._manager.wait_until_finished()
        if self._sealing is not None:
            self._sealing.result()
            self._sealing = None
        steps, self._unsealed = self._unsealed, []
        if not steps or not self._main:
            return
        if block:
            self._write_manifests(steps)
        else:
            self._sealing = self._sealer.submit(self._write_manifests, steps)

    def save(self, step: int, state, data_state: Optional[dict], config: Optional[dict], force: bool = False) -> bool:
        """Save if `step` is on the cadence or `force`; returns whether a save was started.

        With async saving the device arrays are copied to host before this returns, so the caller may
        donate/overwrite the state right away; the files are written in the background, and their
        checksums after Orbax has renamed the step into place.
        """
        if not force and step % self.every:
            return False
        self._seal(block=False)
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config or {}),
        )
        started = bool(self._manager.save(step, args=args, force=True))
        if started:
            self._unsealed.append(step)
        return started

    # -- restoring

    def _verdict(self, step: int) -> Optional[str]:
        """None (checksums match), UNVERIFIED (no manifest) or why the step is corrupt; process 0 hashes,
        every process gets its verdict."""
        reason = verify_manifest(self._step_dir(step)) if self._main else None
        if jax.process_count() == 1:
            return reason
        code = _from_process_0({None: 0, UNVERIFIED: 1}.get(reason, 2))
        return reason if self._main else [None, UNVERIFIED, "corrupt (see process 0)"][code]

    def _move_aside(self, steps: list[int]) -> dict[int, str]:
        """Move corrupt steps to `corrupt/<step>-<UTC time>`, out of what Orbax lists; {step: new path}."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved = {s: os.path.join(self.directory, CORRUPT_DIR, f"{s}-{stamp}") for s in steps}
        if self._main:
            os.makedirs(os.path.join(self.directory, CORRUPT_DIR), exist_ok=True)
            for s, dest in moved.items():
                os.rename(self._step_dir(s), dest)
        if jax.process_count() > 1:
            _from_process_0(0)  # a barrier: nobody re-lists the steps before process 0 has moved them
        self._manager.reload()
        return moved

    def _restore(self, step: int, args):
        _quiet_failed_restores()
        return self._manager.restore(step, args=args)

    def restore(self, abstract_state, step: Optional[int] = None, *, config: Optional[dict] = None,
                defaults: Optional[dict] = None, allow: Union[bool, Sequence[str]] = ()) -> Optional[Restored]:
        """Restore `step` (default: the newest usable one) onto the shardings in `abstract_state`.

        Returns None when the directory has no checkpoint. Each step's checksums are verified first (a step
        without a manifest restores unverified, with a warning). A corrupt or unreadable step is skipped and
        the next older one tried; once one restores, the skipped ones are moved to `corrupt/` and ONE
        warning says so. With `config` (the current resolved config dict), a step saved with other values
        for keys outside `SAFE_TO_CHANGE` / `allow` raises `ConfigChanged` (`defaults`: the values of keys
        an older checkpoint lacks). Nothing usable at all raises `CheckpointError` and moves nothing.
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        skipped: list[tuple[int, str]] = []
        for s in steps:
            reason = self._verdict(s)
            if reason not in (None, UNVERIFIED):
                skipped.append((s, reason))
                continue
            try:
                changed = self._check_config(s, config, defaults, allow) if config is not None else {}
                out = self._restore(s, ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore()))
            except ConfigChanged:
                raise
            except Exception as e:  # noqa: BLE001 — any failure to read means "not usable"
                skipped.append((s, f"Orbax cannot read it: {short_error(e)}"))
                continue
            self._report(s, reason, skipped)
            return Restored(step=s, state=out.state, data_state=out.data or None, config=out.config or None,
                            changed=changed)
        if skipped:
            tried = "; ".join(f"step {s}: {r}" for s, r in skipped)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} (tried {tried}); nothing was moved or deleted: "
                "inspect it, then move it away (or set another checkpoint.dir) to start afresh")
        return None

    def _check_config(self, step: int, config: dict, defaults: Optional[dict], allow) -> dict:
        saved = self._restore(step, ocp.args.Composite(config=ocp.args.JsonRestore())).config or {}
        if not saved:  # written without a config (tests, tools): nothing to compare with
            return {}
        changes = config_changes(saved, config, defaults)
        refused = refused_changes(changes, allow)
        if refused:
            listed = describe_changes({k: changes[k] for k in refused})
            raise ConfigChanged(
                f"checkpoint.dir {self.directory} step {step} was saved with another config: {listed}; "
                "resume with the saved values, use a new checkpoint.dir, or allow it with "
                f"checkpoint.allow_config_change=[{','.join(refused)}] (or true)")
        return changes

    def _report(self, step: int, verdict: Optional[str], skipped: list[tuple[int, str]]) -> None:
        """One warning for what the restore of `step` had to do: skip (and move aside) newer steps, or trust a
        step without checksums."""
        notes = []
        if skipped:
            moved = self._move_aside([s for s, _ in skipped])
            notes += [f"step {s} is corrupt ({r}), moved to {os.path.relpath(moved[s], self.directory)}"
                      for s, r in skipped]
            notes.append(f"restored step {step} instead; the steps after it will be trained (and saved) again")
        if verdict == UNVERIFIED:
            notes.append(f"step {step} has no checksums (saved by an older xr_jax, or the run ended before they "
                         "were written) and is restored unverified")
        if notes and self._main:
            log.warning("checkpoint %s: %s", self.directory, "; ".join(notes))

    # -- ending

    def wait(self) -> None:
        """Block until background writes (Orbax's and the checksums) are finished."""
        self._seal(block=True)

    def close(self) -> None:
        """Finish writing, then release the directory's lock (also when finishing fails)."""
        try:
            self._seal(block=True)
            self._manager.close()
        finally:
            if self._sealer is not None:
                self._sealer.shutdown()
            if self._lock is not None:
                self._lock.release()
