"""Progress bars for long work, in a terminal and in Jupyter (through rich)."""

from __future__ import annotations

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
            def advance(self, amount: float = 1) -> None:
                progress.advance(task, amount)

            def update(self, completed: float, total: float | None = None) -> None:
                progress.update(task, completed=completed, total=total)

        yield _Bar()
