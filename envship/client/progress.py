"""Progress bars for long work, in a terminal and in Jupyter (through rich)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class _Silent:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, completed: float, total: float | None = None) -> None:
        pass


@contextmanager
def progress_bar(description: str, total: float | None, enabled: bool) -> Iterator:
    """A bar with ``advance(n)`` and ``update(completed, total)``; silent if disabled.

    Examples
    --------
    >>> with progress_bar("packing", total=3, enabled=False) as bar:
    ...     bar.advance()
    """
    if not enabled:
        yield _Silent()
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total)

        class _Bar:
            # Hot loops advance per file: hand rich a sum a few times a second.
            pending = 0.0
            flushed = time.monotonic()

            def advance(self, amount: float = 1) -> None:
                self.pending += amount
                now = time.monotonic()
                if now - self.flushed > 0.1:
                    progress.advance(task, self.pending)
                    self.pending, self.flushed = 0.0, now

            def update(self, completed: float, total: float | None = None) -> None:
                progress.update(task, completed=completed, total=total)

        bar = _Bar()
        yield bar
        progress.advance(task, bar.pending)
