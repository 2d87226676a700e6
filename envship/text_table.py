"""Plain-text tables that fit a terminal without ever cutting what users type.

The command line and the reprs of envship's reports print tables whose first
column holds names users type again (``envship use NAME``, ``--worker NAME``).
A :class:`TextTable` keeps such columns whole: to fit a width it drops the
columns marked optional, in the order given, and if the table still does not
fit, it prints each row as its kept cells on one line and the rest indented
on the lines below. No colours, no box: it reads the same in a pipe, a log
and a notebook.

:func:`clock_time` shows a moment as the clock on the wall did. This module
knows nothing of envship's data; it only lays out text.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from datetime import datetime

from dask.utils import format_time


@dataclass(frozen=True)
class Col:
    """One column: its header, whether it is kept whole, when it may go.

    ``keep``: never dropped nor cut (names, ids). ``drop``: columns with a
    drop rank go, lowest rank first, when the table is too wide; None: never
    dropped. ``right``: align to the right (sizes, counts).
    """

    header: str
    keep: bool = False
    drop: int | None = None
    right: bool = False


class TextTable:
    """Rows of text cells, laid out to fit ``width`` columns.

    Examples
    --------
    >>> table = TextTable(Col("name", keep=True), Col("size", right=True),
    ...                   Col("created", drop=1))
    >>> table.add_row("py2-sklearn-dev", "80 MiB", "2026-12-04 05:21")
    >>> print(table.render(width=80))
    name               size  created
    py2-sklearn-dev  80 MiB  2026-12-04 05:21
    >>> print(table.render(width=26))
    name               size
    py2-sklearn-dev  80 MiB
    >>> print(table.render(width=12))
    py2-sklearn-dev
        size 80 MiB,
        created 2026-12-04 05:21
    """

    GAP = "  "

    def __init__(self, *columns: Col | str) -> None:
        self.columns = [c if isinstance(c, Col) else Col(c) for c in columns]
        self.rows: list[list[str]] = []

    def add_row(self, *cells: object) -> None:
        """A row, one cell per column; None shows as ``-``."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(["-" if c is None else str(c) for c in cells])

    def render(self, width: int | None = 80) -> str:
        """The table as lines of at most ``width`` characters where possible.

        Only a kept cell longer than ``width`` makes a longer line. None: no
        limit, every column.
        """
        shown = list(range(len(self.columns)))
        if width is not None:
            ranked = sorted(
                (c.drop, i) for i, c in enumerate(self.columns) if c.drop is not None
            )
            for _, i in ranked:
                if self._width(shown) <= width:
                    break
                shown.remove(i)
            if self._width(shown) > width:
                return self._stacked(width)
        return "\n".join(self._lines(shown))

    def __str__(self) -> str:
        return self.render()

    def _widths(self, shown: list[int]) -> dict[int, int]:
        return {
            i: max(
                [len(self.columns[i].header)] + [len(r[i]) for r in self.rows],
            )
            for i in shown
        }

    def _width(self, shown: list[int]) -> int:
        if not self.rows:
            return 0
        # The last column is not padded, so only its own cells count.
        widths = self._widths(shown)
        return sum(widths.values()) + len(self.GAP) * (len(shown) - 1)

    def _lines(self, shown: list[int]) -> list[str]:
        widths = self._widths(shown)
        last = shown[-1] if shown else None

        def line(cells: list[str]) -> str:
            parts = []
            for i in shown:
                c, w = self.columns[i], widths[i]
                if c.right:
                    parts.append(cells[i].rjust(w))
                else:
                    parts.append(cells[i] if i == last else cells[i].ljust(w))
            return self.GAP.join(parts).rstrip()

        return [line([c.header for c in self.columns])] + [line(r) for r in self.rows]

    def _stacked(self, width: int) -> str:
        lines = []
        kept = [i for i, c in enumerate(self.columns) if c.keep] or [0]
        for row in self.rows:
            lines.append("  ".join(row[i] for i in kept))
            details = [
                f"{c.header} {row[i]}"
                for i, c in enumerate(self.columns)
                if i not in kept and row[i] != "-"
            ]
            # Whole "header value" pairs per line: a value is never split.
            line = ""
            for item in details:
                if line and len(line) + 2 + len(item) > width:
                    lines.append(line + ",")
                    line = ""
                line = f"{line}, {item}" if line else f"    {item}"
            if line:
                lines.append(line)
        return "\n".join(lines)


def wrap_notes(notes: list[str], width: int | None) -> list[str]:
    """Notes under a table, wrapped to ``width`` and indented after their first line.

    Names are never split, at a hyphen or anywhere (``width`` None: as they are).

    Examples
    --------
    >>> wrap_notes(["switching sklearn-dev on 2 workers"], 20)
    ['switching', '    sklearn-dev on 2', '    workers']
    """
    if width is None:
        return notes
    return [
        line
        for note in notes
        for line in textwrap.wrap(
            note,
            width,
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    ]


def clock_time(timestamp: float, now: float | None = None) -> str:
    """A unix time as a local wall-clock time: ``HH:MM:SS`` today, else with the date.

    Examples
    --------
    >>> import time
    >>> now = time.mktime((2026, 12, 4, 15, 0, 0, 0, 0, -1))
    >>> clock_time(now - 90, now)
    '14:58:30'
    >>> clock_time(now - 86400, now)
    '2026-12-03 15:00'
    """
    then = datetime.fromtimestamp(timestamp)
    today = datetime.fromtimestamp(time.time() if now is None else now).date()
    if then.date() == today:
        return then.strftime("%H:%M:%S")
    return then.strftime("%Y-%m-%d %H:%M")


#: How a worker that runs in its nanny's own environment is shown.
NANNY_OWN = "(nanny's own)"


def worker_environment(worker: dict) -> str:
    """A survey row's environment as the status page and notebook show it.

    Examples
    --------
    >>> worker_environment({"id": "5f0c2d9a1b7e" * 2, "environment": "sklearn-dev"})
    'sklearn-dev (5f0c2d9a)'
    >>> worker_environment({"id": None, "environment": None})
    "(nanny's own)"
    """
    if worker.get("unreachable"):
        return f"(unreachable: {worker['unreachable']})"
    if worker["id"] is None:
        return NANNY_OWN
    return short_name(worker["environment"], worker["id"])


def short_name(name: object, id: str) -> str:
    """A name with the start of its id: ``sklearn-dev (5f0c2d9a)``."""
    return f"{name} ({id[:8]})"


def since_text(since: float | None, now: float) -> str:
    """A start time with how long ago it was; ``?`` for none.

    Examples
    --------
    >>> since_text(None, 0)
    '?'
    >>> since_text(1000.0, 1090.0).endswith("(90.00 s ago)")
    True
    """
    if not since:
        return "?"
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"{clock} ({format_time(max(now - since, 0))} ago)"


def worker_row(worker: dict, now: float) -> list:
    """A survey row as the status page and notebook show it: worker, node,
    site, environment, since."""
    return [
        worker["name"],
        worker["node"],
        worker["site"],
        worker_environment(worker),
        since_text(worker["since"], now),
    ]
