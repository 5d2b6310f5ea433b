"""How a checkpoint directory defends itself, apart from Orbax: the lock, the config fingerprint, checksums.

- `DirLock`: a lock file (`xr_jax.lock`, created with O_CREAT|O_EXCL by process 0) keeps a second run out;
  a lock left by a dead process on this host is taken over with a warning;
- `config_changes` / `refused_changes`: each step's saved config is the run's fingerprint; resuming with other
  values fails and names the keys, except `SAFE_TO_CHANGE` and what `checkpoint.allow_config_change` allows;
- `write_manifest` / `verify_manifest`: SHA-256 checksums of a finalized step's files (`xr_jax_checksums.json`),
  verified before a restore.
`training.Checkpointer` applies them; nothing here knows about Orbax or JAX.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import datetime
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Optional, Sequence, Union

from xr_jax.errors import UserError

log = logging.getLogger(__name__)

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
        return f"unreadable file ({short_error(e)})"
    bad = missing + [f for f, digest in got.items() if digest != expected[f]]
    if not bad:
        return None
    more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
    return f"{'missing file' if bad[0] in missing else 'checksum mismatch in'} {bad[0]}{more}"


def short_error(e: BaseException) -> str:
    """`Type: first line`, without TensorStore's multi-kilobyte spec dump, at most ~160 characters."""
    text = str(e).split(" See full TensorStore details")[0].splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"
