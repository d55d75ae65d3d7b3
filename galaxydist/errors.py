"""One exception type for bad user input, and the CLI wrapper that turns it into exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE_ERROR = 2


class UserError(Exception):
    """Bad input from the user (file, config, argument): reported as one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI main; a UserError becomes one line on stderr and exit code 2, not a traceback."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
