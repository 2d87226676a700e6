"""Progress bars for long work, in a terminal and in Jupyter (through rich).

Two things a bar must not do: collide with log lines, and fail. While a bar
is shown, the logging handlers that write to the terminal (the root's,
distributed's, envship's: a LocalCluster's nannies log in this process) write
through the bar's console, so their lines print above the bar; they get
their streams back when the bar ends. In a Jupyter kernel rich draws the bar
with ipywidgets (``pip install envship[notebook]``); without it, the bar is
two plain lines, a start and an end, never a widget error.

Lines that other processes write to the same terminal (a LocalCluster's
worker processes) cannot be routed: they are not this process's.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class _Silent:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, completed: float, total: float | None = None) -> None:
        pass


class _Lines(_Silent):
    """A bar as two plain lines (a notebook without ipywidgets)."""

    def __init__(self, description: str, total: float | None, counting: bool):
        self.description, self.total, self.counting = description, total, counting
        self.completed = 0.0
        self.started = time.perf_counter()
        print(f"{description} ...", file=sys.stderr, flush=True)

    def advance(self, amount: float = 1) -> None:
        self.completed += amount

    def update(self, completed: float, total: float | None = None) -> None:
        self.completed = completed
        self.total = total if total is not None else self.total

    def close(self) -> None:
        done = ""
        if self.counting and self.total is not None:
            done = f" {self.completed:.0f}/{self.total:.0f},"
        seconds = time.perf_counter() - self.started
        print(
            f"{self.description}:{done} done in {seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def widgets_missing() -> bool:
    """Whether this is a Jupyter kernel without ipywidgets (rich needs them there).

    Examples
    --------
    >>> widgets_missing()  # not in Jupyter
    False
    """
    from rich import get_console

    if not get_console().is_jupyter:
        return False
    return importlib.util.find_spec("ipywidgets") is None


def terminal_handlers() -> list[logging.StreamHandler]:
    """The logging handlers of this process that write to stderr or stdout.

    The root logger's and every named logger's (``distributed``,
    ``envship``...), not those writing to files.
    """
    loggers: list[Any] = [logging.getLogger()]
    loggers += list(logging.Logger.manager.loggerDict.values())
    found: list[logging.StreamHandler] = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and _is_terminal(handler.stream)
                and handler not in found
            ):
                found.append(handler)
    return found


def _is_terminal(stream: TextIO) -> bool:
    if stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def logs_above(console) -> Iterator[None]:
    """Route the terminal's logging handlers through ``console`` (a bar's) meanwhile.

    Examples
    --------
    >>> from rich.console import Console
    >>> with logs_above(Console()):
    ...     logging.getLogger("envship").warning("printed above any bar")
    """
    from rich.file_proxy import FileProxy

    handlers = terminal_handlers()
    saved = []
    for handler in handlers:
        with handler.lock or _no_lock():
            saved.append((handler, handler.stream))
            handler.stream = FileProxy(console, handler.stream)
    try:
        yield
    finally:
        for handler, stream in saved:
            with handler.lock or _no_lock():
                proxy = handler.stream
                handler.stream = stream
            if hasattr(proxy, "flush"):
                proxy.flush()


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


@contextmanager
def progress_bar(
    description: str, total: float | None, enabled: bool, counting: bool = False
) -> Iterator:
    """A bar with ``advance(n)`` and ``update(completed, total)``; silent if disabled.

    ``counting``: the bar counts things (workers, nodes) and shows ``2/5``
    rather than a percentage.

    Examples
    --------
    >>> with progress_bar("packing", total=3, enabled=False) as bar:
    ...     bar.advance()
    """
    if not enabled:
        yield _Silent()
        return
    if widgets_missing():
        lines = _Lines(description, total, counting)
        yield lines
        lines.close()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if counting else TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    # On stderr, as log lines: stdout is for what a command prints.
    console = Console(stderr=True)
    with Progress(*columns, console=console) as progress, logs_above(console):
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
