"""The one progress display (prepare, synthetic, training epochs, evaluate, predict): a rich bar
with the count and the time left on a terminal, nothing (the caller prints lines) otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def track(
    items: Iterable[T], total: int, description: str, enabled: bool = True, rate: str | None = None
) -> Iterator[T]:
    """Iterate `items`, showing a rich progress bar when enabled and stderr is a terminal. With
    `rate` (a unit, e.g. "img"), each item is a count of units done and the bar shows units/s."""
    if not (enabled and is_terminal()):
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if rate:
        columns.append(TextColumn("{task.fields[speed]}"))
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, speed="")
        for item in items:
            yield item
            bar.advance(task, int(item) if rate else 1)
            if rate:
                speed = bar.tasks[0].speed
                bar.update(task, speed=f"{speed:.0f} {rate}/s" if speed else "")
