"""Orbax checkpoints of a training run: train state, data-iterator position and the resolved config.

One `CheckpointManager` directory, one sub-directory per step, each with three items: `state` (the
sharded TrainState: params, optimizer state, step, RNG), `data` (the iterator's JSON state) and
`config` (the resolved config dict). Orbax writes each step to a temporary directory and renames it
when complete, so a save killed half-way is never taken for a checkpoint. Restoring reads the state
straight into the shardings of the *current* mesh, whatever mesh wrote it.

The directory defends itself (docs/checkpoints.md):
- a lock file (`xr_jax.lock`, created with O_CREAT|O_EXCL by process 0) keeps a second run out; a lock
  left by a dead process on this host is taken over with a warning;
- each step's `config` item is the run's fingerprint: resuming with other values fails and names the
  keys, except `SAFE_TO_CHANGE` and what `checkpoint.allow_config_change` allows;
- once Orbax has finalized a step, a manifest of SHA-256 checksums (`xr_jax_checksums.json`) is written
  into it; a restore verifies it first, and a step that is corrupt (or that Orbax cannot read) is moved
  to `corrupt/` once an older step has been restored instead, so that step is saved again when reached.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import datetime
import hashlib
import inspect
import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from xr_jax.errors import UserError

log = logging.getLogger("xr_jax.checkpoints.training")

LOCK_FILE = "xr_jax.lock"
MANIFEST_FILE = "xr_jax_checksums.json"
CORRUPT_DIR = "corrupt"
UNVERIFIED = "unverified"  # the verdict on a step without a checksum manifest

# Keys (or whole sections) whose change does not alter what the saved state means: run length, output,
# cadence and evaluation settings, and memory/layout knobs that compute the same function (restoring onto
# another mesh is supported). Everything else (model, data, optimizer, seeds, GRPO loss...) is refused.
SAFE_TO_CHANGE = (
    "train.steps", "train.epochs", "train.export_dir", "train.peak_flops", "train.nan_patience",
    "train.microbatches", "train.loss_chunk", "grpo.microbatches", "grpo.reward_workers",
    "model.remat", "model.attention", "mesh.shape", "checkpoint", "logging", "eval", "distributed",
)


class CheckpointError(UserError):
    """A checkpoint directory that cannot be used as it is (locked, other config, nothing readable)."""


class CheckpointLocked(CheckpointError):
    """Another run holds the checkpoint directory."""


class ConfigChanged(CheckpointError):
    """The checkpoints were written with other values for keys that change what training does."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Optional[dict]
    config: Optional[dict]
    changed: dict = dataclasses.field(default_factory=dict)  # allowed config changes: {key: (saved, now)}


# ----------------------------------------------------------------------------- config fingerprint


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_changes(saved: dict, current: dict, defaults: Optional[dict] = None) -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every key that differs. A key missing on one side
    (written by another xr_jax version) counts as its default value."""
    old, new, dflt = _flatten(saved), _flatten(current), _flatten(defaults or {})
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, dflt.get(key)), new.get(key, dflt.get(key))
        if a != b:
            out[key] = (a, b)
    return out


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items())


def refused_changes(changes: dict, allow: Union[bool, Sequence[str]] = ()) -> list[str]:
    """The changed keys that neither `SAFE_TO_CHANGE` nor `allow` (True: everything; else keys/sections) permit."""
    if allow is True:
        return []
    return [k for k in changes if not _matches(k, SAFE_TO_CHANGE) and not _matches(k, allow or ())]


# ----------------------------------------------------------------------------- lock


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """An exclusive lock on a checkpoint directory: a JSON file naming its holder, created atomically.

    O_CREAT|O_EXCL is atomic on local filesystems and on NFSv3+ (and the Lustre/GPFS family), which is
    where multi-host checkpoints live. A holder on this host is stale when its pid is gone, belongs to
    another process (start time differs) or the machine has rebooted since; a holder on another host
    cannot be checked from here, so the message says which file to delete if that run is known dead.
    """

    STALE_EMPTY_S = 60.0  # a lock file still empty after this long was left by a crash mid-creation

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self.token: Optional[str] = None

    @staticmethod
    def _parse(path: str) -> Optional[dict]:
        try:
            with open(path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _read(self) -> Optional[dict]:
        return self._parse(self.path)

    def _stale(self, holder: Optional[dict]) -> bool:
        if holder is None:  # unreadable: being written right now, or left empty by a crash
            try:
                return time.time() - os.path.getmtime(self.path) > self.STALE_EMPTY_S
            except OSError:
                return False
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
            return True
        if not _pid_alive(pid):
            return True
        return holder.get("pid_start") is not None and holder.get("pid_start") != _process_start(pid)

    def _take_over(self, holder: Optional[dict]) -> bool:
        """Move a stale lock out of the way; False when another run replaced it meanwhile (then it is theirs)."""
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else moved it: race for the O_EXCL create again
        moved = self._parse(aside)
        if moved is not None and (holder is None or moved.get("token") != holder.get("token")):
            try:  # we moved a fresh lock of another run: give it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        log.warning("took over the stale lock of %s (%s)", os.path.dirname(self.path), describe_holder(holder))
        return True

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "boot_id": _boot_id(), "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "token": uuid.uuid4().hex}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if self._stale(holder) and self._take_over(holder):
                    continue
                raise CheckpointLocked(
                    f"checkpoint.dir {os.path.dirname(self.path)} is in use by another run "
                    f"({describe_holder(holder)}); wait for it to end or use another checkpoint.dir "
                    f"(if that run is dead, delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.token = me["token"]
            atexit.register(self.release)
            return
        raise CheckpointLocked(f"could not take the lock {self.path}: other runs keep replacing it")

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent; also runs at interpreter exit)."""
        if self.token is None:
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            os.remove(self.path)
        self.token = None


def describe_holder(holder: Optional[dict]) -> str:
    if holder is None:
        return "holder unknown: the lock file is empty or unreadable"
    cmd = str(holder.get("command", "?"))
    cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, command: {cmd}"


# ----------------------------------------------------------------------------- checksums


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)  # releases the GIL: files hash in parallel on the pool's threads
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in out if f != MANIFEST_FILE)


def _digests(step_dir: str, files: Sequence[str]) -> dict[str, str]:
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(lambda f: _sha256(os.path.join(step_dir, f)), files)))


def write_manifest(step_dir: str) -> None:
    """Checksum every file of a finalized step into `step_dir/xr_jax_checksums.json` (atomic replace)."""
    manifest = {"algorithm": "sha256", "files": _digests(step_dir, _files(step_dir))}
    tmp = os.path.join(step_dir, f".{MANIFEST_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST_FILE))


def verify_manifest(step_dir: str) -> Optional[str]:
    """None when every file matches the step's manifest, UNVERIFIED when it has none, else what differs."""
    try:
        with open(os.path.join(step_dir, MANIFEST_FILE)) as f:
            expected = json.load(f)["files"]
    except FileNotFoundError:
        return UNVERIFIED
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable checksum manifest ({type(e).__name__})"
    missing = [f for f in expected if not os.path.isfile(os.path.join(step_dir, f))]
    try:
        got = _digests(step_dir, [f for f in expected if f not in missing])
    except OSError as e:
        return f"unreadable file ({_short(e)})"
    bad = missing + [f for f, digest in got.items() if digest != expected[f]]
    if not bad:
        return None
    more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
    return f"{'missing file' if bad[0] in missing else 'checksum mismatch in'} {bad[0]}{more}"


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


def _short(e: BaseException) -> str:
    """`Type: first line`, without TensorStore's multi-kilobyte spec dump, at most ~160 characters."""
    text = str(e).split(" See full TensorStore details")[0].splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"


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
                            s, _short(e))

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
                skipped.append((s, f"Orbax cannot read it: {_short(e)}"))
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
