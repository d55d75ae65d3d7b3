"""The one progress display (prepare, synthetic, training epochs, evaluate, predict): a rich bar
with the count and the time left on a terminal, nothing (the caller prints lines) otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def track(items: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate `items`, showing a rich progress bar when enabled and stderr is a terminal."""
    if not (enabled and is_terminal()):
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
