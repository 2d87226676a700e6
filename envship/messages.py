"""Typed messages that nannies, the scheduler and clients all read.

A message from another process is a dict of msgpack values; here it becomes a
frozen dataclass whose every field was checked once for type and bounds
(``from_msg``), and goes back to the same dict (``to_msg``). What a handler
*takes* (its keyword arguments) is refused like a call with wrong arguments
is (TypeError for a missing or unknown one, ValueError for a wrong value:
:func:`call_arguments`); what a handler *answers* is refused with ValueError
whatever is wrong, and keys that a newer sender adds are ignored.

This module sits on the bottom floor (it imports only :mod:`envship.ids`), so
that node, scheduler, client and :mod:`envship.survey` may all import it.
Messages that carry an offer live with the registry's
(:mod:`envship.registry_messages`), above :mod:`envship.transfer`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from envship.ids import Address, EnvId, check_address, check_id, check_text

T = TypeVar("T")
#: The longest error text a message may carry (an exception's message).
MAX_ERROR = 64 * 1024
#: The most items a list in a message may hold.
MAX_ITEMS = 100_000


# -- reading fields ---------------------------------------------------------------


def call_arguments(message: type, msg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a handler call, with the defaults of ``message``'s fields.

    Refused as Python refuses a function called with wrong arguments: the
    handlers took keyword arguments before they took messages, and their
    callers (and the fuzz test) see the same TypeError as then.

    Examples
    --------
    >>> @dataclass
    ... class Release:
    ...     owner: str
    >>> call_arguments(Release, {"owner": "me"})
    {'owner': 'me'}
    >>> call_arguments(Release, {"owner": "me", "x": 1})
    Traceback (most recent call last):
    ...
    TypeError: Release() got an unexpected keyword argument 'x'
    """
    known = {f.name: f for f in fields(message)}
    for key in msg:
        if key not in known:
            raise TypeError(
                f"{message.__name__}() got an unexpected keyword argument {key!r}"
            )
    arguments = {}
    for name, f in known.items():
        if name in msg:
            arguments[name] = msg[name]
        elif f.default is not MISSING:
            arguments[name] = f.default
        else:
            raise TypeError(
                f"{message.__name__}() missing 1 required positional argument: {name!r}"
            )
    return arguments


def reply_fields(msg: object, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    """``msg`` if it is a dict with the ``required`` keys; ValueError naming ``what`` if not."""
    if not isinstance(msg, dict):
        raise ValueError(f"{what} must be a dict, not {type(msg).__name__}")
    missing = [key for key in required if key not in msg]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    return msg


def optional(check: Callable[[object], T], value: object) -> T | None:
    """``check(value)``, or None if ``value`` is None."""
    return None if value is None else check(value)


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, not {value!r}")
    return value


def check_count(value: object, what: str, most: int = 1 << 62) -> int:
    """``value`` if it is an int from 0 to ``most`` (not a bool); ValueError if not."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise ValueError(f"{what} must be a count, not {value!r}")
    return value


def check_seconds(value: object, what: str) -> float:
    """``value`` if it is a finite number of seconds (or a unix time); ValueError if not."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
    ):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}")
    return float(value)


def check_error(value: object) -> str:
    """``value`` if it is an error's text (a string, not too long); ValueError if not."""
    if not isinstance(value, str) or len(value) > MAX_ERROR:
        raise ValueError(f"an error must be a string, not {value!r:.200}")
    return value


def check_list(value: object, what: str, most: int = MAX_ITEMS) -> list:
    """``value`` if it is a list (or tuple) of at most ``most`` items; ValueError if not."""
    if not isinstance(value, list | tuple) or len(value) > most:
        raise ValueError(f"{what} must be a list of at most {most} items")
    return list(value)


# -- serving handlers ---------------------------------------------------------------


def serve(method: Callable[..., Any], request: Any = None) -> Callable[..., Any]:
    """A comm handler for ``method``: its keyword arguments made into ``request``.

    A handler without ``request`` takes no arguments. The answer goes on the
    wire as its ``to_msg()`` (a string, bytes or a bool as they are). A coroutine
    ``method`` gives a coroutine handler (distributed awaits it).

    Examples
    --------
    >>> @dataclass(frozen=True)
    ... class Echo:
    ...     text: str
    ...     @classmethod
    ...     def from_msg(cls, msg):
    ...         return cls(check_text(call_arguments(cls, msg)["text"], "a text"))
    >>> def echo(request: Echo) -> str:
    ...     return request.text
    >>> handler = serve(echo, Echo)
    >>> handler.__name__, handler(text="hi")
    ('envship_echo', 'hi')
    >>> handler(txt="hi")
    Traceback (most recent call last):
    ...
    TypeError: Echo() got an unexpected keyword argument 'txt'
    """

    def take(msg: dict[str, Any]) -> tuple:
        if request is not None:
            return (request.from_msg(msg),)
        if msg:
            raise TypeError(
                f"{method.__name__}() got an unexpected keyword argument "
                f"{next(iter(msg))!r}"
            )
        return ()

    handle: Callable[..., Any]
    if inspect.iscoroutinefunction(method):

        async def handle(**msg):
            return on_wire(await method(*take(msg)))

    else:

        def handle(**msg):
            return on_wire(method(*take(msg)))

    handle.__name__ = handle.__qualname__ = f"envship_{method.__name__}"
    return handle


def on_wire(answer: Any) -> Any:
    """What goes on the wire for a handler's ``answer``: its ``to_msg()``, or itself."""
    return answer if isinstance(answer, str | bytes | bool) else answer.to_msg()


# -- the nanny's status ----------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """``envship_status(cache)``: the nanny's state; with ``cache``, its cache's size."""

    cache: bool = False

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Status:
        return cls(check_bool(call_arguments(cls, msg)["cache"], "cache"))

    def to_msg(self) -> dict:
        return {"cache": self.cache}


@dataclass(frozen=True)
class TransferState:
    """A download under way on a nanny: pieces held of how many, from whom."""

    id: EnvId
    name: str
    have: int
    count: int
    bytes: int
    sources: tuple[str, ...] = ()
    error: str | None = None

    def to_msg(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "have": self.have,
            "count": self.count,
            "bytes": self.bytes,
            "sources": list(self.sources),
            "error": self.error,
        }

    @classmethod
    def from_msg(cls, msg: object) -> TransferState:
        m = reply_fields(msg, "a transfer", ("id", "name", "have", "count", "bytes"))
        sources = check_list(m.get("sources", ()), "a transfer's sources")
        return cls(
            id=check_id(m["id"]),
            name=check_text(m["name"], "an environment name"),
            have=check_count(m["have"], "pieces held"),
            count=check_count(m["count"], "a piece count"),
            bytes=check_count(m["bytes"], "a blob size"),
            sources=tuple(check_text(s, "a source") for s in sources),
            error=optional(check_error, m.get("error")),
        )


@dataclass(frozen=True)
class ZygoteState:
    """A zygote of a nanny's process: its environment, pid and resident memory.

    Examples
    --------
    >>> zygote = ZygoteState(id="5f0c" * 8, name="sklearn-dev", pid=4242,
    ...                      rss=52428800)
    >>> ZygoteState.from_msg(zygote.to_msg()) == zygote
    True
    >>> ZygoteState.from_msg({**zygote.to_msg(), "rss": -1})
    Traceback (most recent call last):
    ...
    ValueError: a zygote's memory must be a count, not -1
    """

    id: EnvId
    name: str
    pid: int
    rss: int

    def to_msg(self) -> dict:
        return {"id": self.id, "name": self.name, "pid": self.pid, "rss": self.rss}

    @classmethod
    def from_msg(cls, msg: object) -> ZygoteState:
        m = reply_fields(msg, "a zygote", ("id", "name", "pid", "rss"))
        return cls(
            id=check_id(m["id"]),
            name=check_text(m["name"], "an environment name"),
            pid=check_count(m["pid"], "a zygote's pid"),
            rss=check_count(m["rss"], "a zygote's memory"),
        )


@dataclass(frozen=True)
class NannyStatus:
    """A nanny's ``envship_status``: its last switch, what its worker runs in, its node.

    ``ok``, ``error`` and ``seconds`` tell how the last switch went;
    ``running`` and ``name`` what the worker runs in (None: the nanny's own
    environment) since ``since``; ``default`` the administrators' default
    environment, once resolved; ``cache_root`` and ``cache_size`` the node
    cache (its size only when asked for, a walk of its files); ``transfers``
    the downloads under way; ``zygotes`` those of the nanny's process (all
    nannies of one process report the same).

    Examples
    --------
    >>> status = NannyStatus(ok=True, node="host:2049:1234", since=1.5e9,
    ...                      cache_root="/scratch/envship")
    >>> NannyStatus.from_msg(status.to_msg()) == status
    True
    >>> NannyStatus.from_msg({**status.to_msg(), "running": "../../etc"})
    Traceback (most recent call last):
    ...
    ValueError: not a content id: '../../etc'
    """

    ok: bool
    node: str
    since: float
    cache_root: str
    error: str | None = None
    seconds: float | None = None
    running: EnvId | None = None
    name: str | None = None
    default: EnvId | None = None
    worker: Address | None = None
    site: str | None = None
    cache_size: int | None = None
    transfers: tuple[TransferState, ...] = ()
    zygotes: tuple[ZygoteState, ...] = ()

    def to_msg(self) -> dict:
        return {
            "ok": self.ok,
            "error": self.error,
            "seconds": self.seconds,
            "running": self.running,
            "name": self.name,
            "since": self.since,
            "default": self.default,
            "worker": self.worker,
            "node": self.node,
            "site": self.site,
            "cache": {"root": self.cache_root, "size": self.cache_size},
            "transfers": [t.to_msg() for t in self.transfers],
            "zygotes": [z.to_msg() for z in self.zygotes],
        }

    @classmethod
    def from_msg(cls, msg: object) -> NannyStatus:
        """A nanny's reply, checked; ValueError if anything in it is wrong."""
        m = reply_fields(msg, "a nanny's status", ("ok", "node", "since", "cache"))
        cache = reply_fields(m["cache"], "a nanny's cache", ("root",))
        transfers = check_list(m.get("transfers", ()), "a nanny's transfers")
        zygotes = check_list(m.get("zygotes", ()), "a nanny's zygotes")
        return cls(
            ok=check_bool(m["ok"], "ok"),
            node=check_text(m["node"], "a node"),
            since=check_seconds(m["since"], "since"),
            cache_root=check_text(cache["root"], "a cache folder"),
            error=optional(check_error, m.get("error")),
            seconds=optional(lambda s: check_seconds(s, "seconds"), m.get("seconds")),
            running=optional(check_id, m.get("running")),
            name=optional(lambda n: check_text(n, "a name"), m.get("name")),
            default=optional(check_id, m.get("default")),
            worker=optional(
                lambda a: check_address(a, "a worker address"), m.get("worker")
            ),
            site=optional(lambda s: check_text(s, "a site"), m.get("site")),
            cache_size=optional(
                lambda s: check_count(s, "a cache size"), cache.get("size")
            ),
            transfers=tuple(TransferState.from_msg(t) for t in transfers),
            zygotes=tuple(ZygoteState.from_msg(z) for z in zygotes),
        )
