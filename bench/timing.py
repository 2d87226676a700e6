"""What every benchmark here shares: interleaved runs, medians with spread, verdicts.

A sceptic's rules (``../shared/notes/perf-floor.md``, last section), in code:
compared runs interleave (the order rotates each round: A B, B A, A B ...,
so neither side always goes first into a cold cache or a busy minute);
figures are medians with their spread (min-max); and every target gets a
PASS or MISS decided on the unrounded value and printed with as many digits
as it takes to show which side of the target it lies (2.9993 is not 3).

Examples
--------
>>> s = Sample([3.0, 1.0, 2.0])
>>> s.median, s.low, s.high
(2.0, 1.0, 3.0)
>>> str(s)
'2.00 (1.00-3.00, n=3)'
>>> exact(2.99996, 3)
'2.99996'
>>> exact(1.25, 3)
'1.25'
>>> verdict(2.9993, ">=", 3)
'MISS'
>>> order = []
>>> runs = interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2)
>>> order
['a', 'b', 'b', 'a']
>>> sorted(runs), len(runs["a"])
(['a', 'b'], 2)
"""

from __future__ import annotations

import argparse
import operator
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_HOW: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Seconds that ``fn(*args, **kwargs)`` took, and what it returned."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


class Sample:
    """Repeated measurements of one thing: median and spread."""

    def __init__(self, values: Iterable[float]):
        self.values = list(values)
        if not self.values:
            raise ValueError("a sample needs at least one value")

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __str__(self) -> str:
        return (
            f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f}, n={len(self.values)})"
        )


def rotated(names: list[T], round: int) -> list[T]:
    """The order of round ``round``: as given, reversed every other round."""
    return names if round % 2 == 0 else names[::-1]


def interleave(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    before_round: Callable[[], object] = lambda: None,
) -> dict[str, list[float]]:
    """Time each of ``runs`` once per round, rotating the order every round.

    ``before_round`` runs untimed at the start of each round (a warm-up).
    Returns the seconds of every run, by name, in round order.
    """
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        before_round()
        for name in rotated(names, r):
            took, _ = timed(runs[name])
            seconds[name].append(took)
    return seconds


def exact(value: float, target: float) -> str:
    """``value`` with the fewest decimals (at least two) that keep it off ``target``.

    A value that is not the target never prints as the target.
    """
    for decimals in range(2, 12):
        text = f"{value:.{decimals}f}"
        if value == target or float(text) != target:
            return text
    return repr(value)


def verdict(value: float, how: str, target: float) -> str:
    """``"PASS"`` if ``value how target`` holds (unrounded), else ``"MISS"``."""
    return "PASS" if _HOW[how](value, target) else "MISS"


def target_line(label: str, value: float, how: str, target: float) -> str:
    """One printed target: label, exact value, bound, PASS or MISS."""
    return (
        f"  {label:<52} {exact(value, target):>10}  target {how} {target:<5} "
        f"{verdict(value, how, target)}"
    )


def small_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with ``--small``: tiny sizes, for CI (crash checks)."""
    parser = argparse.ArgumentParser(
        description=(description or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny sizes, two nodes, seconds: the same code path, for CI",
    )
    return parser
