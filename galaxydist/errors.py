"""One exception type for bad user input, and the CLI wrapper that turns it into exit code 2."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

USAGE_ERROR = 2


class UserError(Exception):
    """Bad input from the user (file, config, argument): reported as one line, exit code 2."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI main; a UserError becomes one line on stderr and exit code 2, not a traceback.

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
    finally:
        signal.signal(signal.SIGTERM, previous)
