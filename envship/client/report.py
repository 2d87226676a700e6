"""What a switch (or a prepare) returns: per worker how it went, and what moved.

Only data, how it is shown and how stage times add up; collecting it from the
nannies is a step of :class:`envship.client.switch.Switch`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dask.utils import format_bytes

from envship.errors import EnvshipError
from envship.text_table import NANNY_OWN, Col, TextTable, wrap_notes
from envship.transfer import ShipReport


@dataclass(frozen=True)
class WorkerReport:
    """How one worker's switch went.

    ``name`` is the worker's identity, which survives its restarts: its name,
    or for a worker started without one, its nanny's address (its own
    ``address``, after the switch, is a new one). ``workers=[name]`` and
    ``envship use --worker NAME`` take it.
    """

    name: str
    nanny: str
    address: str | None
    environment: str | None  # the id it runs in; None: the nannies' own
    seconds: float
    ok: bool
    error: str | None = None


@dataclass(eq=False)
class SwitchReport(Mapping[str, WorkerReport]):
    """How a switch went: per worker, and what was shipped and unpacked.

    ``workers`` maps each worker's name (for a worker started without one,
    its nanny's address: see :class:`WorkerReport`) to its report. For
    compatibility with the dict this report once was, the report itself is a
    read-only mapping over ``workers``: ``report["worker-0"]``,
    ``set(report)``, ``report.values()`` and ``len(report)`` read it.

    ``stages`` holds the seconds spent packing, checking, shipping, unpacking
    and restarting; ``transfer`` the bytes the client sent and, per fetching
    nanny, where its bytes came from (a :class:`envship.transfer.ShipReport`);
    ``unpacked``, per node that unpacked it now (one nanny's address), the
    files written and the files linked from the node's file store (None when
    nothing was shipped: a switch back to the nannies' own environment);
    ``gone``, the workers whose nanny left during the call;
    ``missing_optional``, the packages distributed compares beyond the
    required ones (numpy, pandas, lz4) that the client has and the
    environment lacks: data of those types cannot be unpickled on its workers.

    Examples
    --------
    >>> report = SwitchReport(
    ...     {"w-0": WorkerReport("w-0", "tcp://n:1", "tcp://w:2", "5f0c2d9a1b7e9f",
    ...                          2.31, ok=True)},
    ...     stages={"pack": 0.5},
    ... )
    >>> report.ok, report["w-0"].environment, list(report)
    (True, '5f0c2d9a1b7e9f', ['w-0'])
    >>> report
    worker  environment   seconds  status
    w-0     5f0c2d9a1b7e     2.31  ok
    pack 0.50 s
    """

    workers: dict[str, WorkerReport] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    transfer: ShipReport = field(default_factory=ShipReport)
    unpacked: dict[str, dict] | None = None
    gone: tuple[str, ...] = ()
    missing_optional: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every worker's switch went well."""
        return all(r.ok for r in self.workers.values())

    def failed(self) -> list[WorkerReport]:
        """The workers whose switch did not go well."""
        return [r for r in self.workers.values() if not r.ok]

    # The read-only mapping over ``workers`` (see the class docstring).
    def __getitem__(self, name: str) -> WorkerReport:
        return self.workers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def _repr_html_(self) -> str:
        from .html import switch_report

        return switch_report(self)

    def __repr__(self) -> str:
        return self.render()

    def notes(self) -> list[str]:
        """What moved and how long it took, a sentence each (the text and HTML share them)."""
        notes = []
        if self.stages:
            notes.append(", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items()))
        if self.transfer.nodes:
            notes.append(
                f"shipped to {len(self.transfer.nodes)} node(s); the client sent "
                f"{format_bytes(self.transfer.client_bytes)}"
            )
        unpacked = [
            u for u in (self.unpacked or {}).values() if u["written"] or u["linked"]
        ]
        if unpacked:
            notes.append(
                f"unpacked on {len(unpacked)} node(s): "
                f"{sum(u['written'] for u in unpacked)} files written, "
                f"{sum(u['linked'] for u in unpacked)} linked from the nodes' file stores"
            )
        if self.gone:
            notes.append(
                "left the cluster during the call: " + ", ".join(map(str, self.gone))
            )
        if self.missing_optional:
            notes.append(
                f"the environment lacks {', '.join(self.missing_optional)} that this "
                "client has: results of those types cannot be unpickled on its workers"
            )
        return notes

    def render(self, width: int | None = 80) -> str:
        """The report as text, each line within ``width`` (names are never cut)."""
        table = TextTable(
            Col("worker", keep=True),
            Col("environment"),
            Col("seconds", right=True),
            Col("status"),
        )
        failures = []
        for name, r in sorted(self.workers.items(), key=lambda kv: str(kv[0])):
            env = r.environment[:12] if r.environment else NANNY_OWN
            table.add_row(name, env, f"{r.seconds:.2f}", "ok" if r.ok else "FAILED")
            if not r.ok:
                failures.append(f"{name}: {r.error}")
        notes = self.notes()
        lines = [table.render(width), *wrap_notes(failures + notes, width)]
        return "\n".join(lines)


class SwitchFailedError(EnvshipError):
    """Some workers could not start in the environment; ``report`` says which.

    Those workers run in the nannies' own environment again.
    """

    def __init__(
        self, env: str, problem: str, fix: str | None, report: SwitchReport
    ) -> None:
        super().__init__(env, problem, fix)
        self.report = report

    def __reduce__(self) -> tuple[type[SwitchFailedError], tuple[Any, ...]]:
        return type(self), (self.env, self.problem, self.fix, self.report)


@contextmanager
def timing(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``stages[name]`` (a report's ``stages``).

    Examples
    --------
    >>> stages = {}
    >>> with timing(stages, "check"):
    ...     pass
    >>> list(stages)
    ['check']
    """
    start = time.perf_counter()
    yield
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
