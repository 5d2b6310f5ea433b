"""The one base class of user mistakes, how a run that stopped early says so, the CLI's exit codes, and
the start-of-run check that an output path is writable.

Every error a user can fix (a bad path, config value, data row, checkpoint directory) derives from
`UserError`: the CLI prints it as one line on stderr and exits 2, instead of a traceback. Errors that
mean a bug in xr_jax stay ordinary exceptions and keep their traceback.

Exit codes of `xr-jax` (README "Exit codes"): 0 the command completed (a training run wrote its export);
2 a user error; 75 (EX_TEMPFAIL) a training run stopped by SIGTERM/SIGINT with its checkpoint saved, so
rerunning the same command resumes it (launch/slurm_gpu.sh requeues the job on 75); 1 a training run that
stopped early for good (non-finite steps, data ran out; a checkpoint is saved) or an unexpected error.
"""

from __future__ import annotations

import os
import tempfile


EXIT_USER_ERROR = 2
EXIT_RESUMABLE = 75  # EX_TEMPFAIL (sysexits.h): "try again later" -- rerun the same command to resume
EXIT_STOPPED = 1


class UserError(Exception):
    """A mistake the user can fix; its message says what and where (key, file and line)."""


class RunStopped(Exception):
    """A training run ended before `train.steps` (signal, non-finite steps, data ran out): its checkpoint
    is saved and no export is written, so a `sft && grpo` chain stops here. The CLI prints the message as
    one line on stderr and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_STOPPED):
        super().__init__(message)
        self.exit_code = exit_code


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
    folder = os.path.dirname(os.path.abspath(path))
    try:
        check_writable_dir(folder, what)
    except OutputNotWritable as e:
        raise OutputNotWritable(f"{what} {path!r} cannot be written: {e}".replace(f"{what} {folder!r}",
                                                                                 f"its folder {folder!r}")) from None
    if os.path.isdir(path):
        raise OutputNotWritable(f"{what} {path!r} is a directory, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputNotWritable(f"{what} {path!r} is not writable")
    return os.path.abspath(path)
