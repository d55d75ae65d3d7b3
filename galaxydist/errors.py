"""One exception type for bad user input, and the CLI wrapper that turns it into exit code 2
(and a file system's refusal into exit code 74)."""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

USAGE_ERROR = 2
IO_ERROR = 74  # EX_IOERR: the file system refused (no space, a path through a file, permissions)
# What a file system answers to a path or a write it refuses; other OSErrors (out of memory, too
# many open files, a broken pipe, a loader worker's re-raised error) keep their traceback.
REFUSALS = {
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
}  # fmt: skip


class UserError(Exception):
    """Bad input from the user (file, config, argument): reported as one line, exit code 2."""


def os_error_reason(err: OSError) -> str:
    """The reason and the file ("No space left on device: /run/x.pt"), without [Errno N]."""
    name = err.filename2 or err.filename
    reason = (err.strerror or str(err)).strip().splitlines()[0]  # h5py's messages run on
    return f"{reason}: {name}" if name else reason


def refused_by_file_system(err: OSError) -> bool:
    """A refusal by errno, or an error without one (h5py's) that atomic_path named the file of."""
    return err.errno in REFUSALS or (err.errno is None and bool(err.filename))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI main; a UserError becomes one line on stderr and exit code 2, a file system's
    refusal (an output folder that cannot be made, a full disk) one line and exit code 74, not a
    traceback.

    SIGTERM (`kill`, the end of a batch job) exits with 143 through Python's own unwinding, so
    temporary files are removed and worker processes stopped on the way (train installs its own
    handler: there SIGTERM means "save and stop").
    """
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:
        if not refused_by_file_system(err):
            raise
        print(f"error: {os_error_reason(err)}", file=sys.stderr)
        return IO_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


def warn(message: str) -> None:
    """One line on stderr, with the W&B API key blanked should an error message ever echo it."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        message = message.replace(key, "***")
    print(f"warning: {message}", file=sys.stderr, flush=True)
