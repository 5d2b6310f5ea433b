"""The one base class of user mistakes, and the start-of-run check that an output path is writable.

Every error a user can fix (a bad path, config value, data row, checkpoint directory) derives from
`UserError`: the CLI prints it as one line on stderr and exits 2, instead of a traceback. Errors that
mean a bug in xr_jax stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

import os
import tempfile


class UserError(Exception):
    """A mistake the user can fix; its message says what and where (key, file and line)."""


class OutputNotWritable(UserError, PermissionError):
    """An output directory (or the folder a file goes in) cannot be written."""


def check_writable_dir(path: str, what: str) -> str:
    """Create `path` if needed and prove it is writable by writing and removing a probe file; returns the
    absolute path. Called at start, so a run does not find out after hours of work. `what` names the
    setting in the message (e.g. "checkpoint.dir")."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".xr_jax_write_probe_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputNotWritable(f"{what} {path!r} is not writable ({e.strerror or e})") from None
    return path


def check_writable_file(path: str, what: str) -> str:
    """`check_writable_dir` for the folder a file will be written to (the file itself is not created)."""
    check_writable_dir(os.path.dirname(os.path.abspath(path)) or ".", what)
    if os.path.isdir(path):
        raise OutputNotWritable(f"{what} {path!r} is a directory, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputNotWritable(f"{what} {path!r} is not writable")
    return os.path.abspath(path)
