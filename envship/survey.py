"""Survey a cluster: what every worker runs in, each node's cache, each blob.

Written once for both readers: the client's ``envship.status`` (through
``client.rpc``) and the scheduler's dashboard page (through
``scheduler.rpc``). It asks every nanny for its ``envship_status``, each with a
timeout, so a nanny that died or hangs costs one timeout, never the answer,
and at most ``CONCURRENCY`` at once, so that a thousand nannies do not mean a
thousand connections opened at once by the scheduler or the client.

A :class:`SharedSurvey` shares one gathering among its callers: those that
ask while it is under way, and for ``SHARE_SECONDS`` after (on the
scheduler, longer if gathering took more than ``PAGE_CPU_SHARE`` of a core),
those that ask about the same workers and registry state (a page reloading
every 2 s in several browsers, ``envship.status`` calls). A switch changes
the workers' addresses and the registry, so nobody is shown a state older
than the last switch.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from envship.identity import worker_identity
from envship.messages import NannyStatus, Status, ZygoteState

#: What a survey uses when the scheduler has no registry yet (nobody switched).
EMPTY_REGISTRY: dict[str, dict] = {"offers": {}, "holders": {}, "running": {}}
#: Nannies asked at once; the others wait for a free slot (not counted in
#: their timeout).
CONCURRENCY = 64
#: Seconds a gathered survey is given to those who ask about the same state.
SHARE_SECONDS = 2.0
#: The most of a core the scheduler spends gathering for its page and status.
PAGE_CPU_SHARE = 0.03


@dataclass(frozen=True)
class Surveyed:
    """A survey on the wire: ``envship_survey``'s answer, ``workers``,
    ``nodes`` and ``blobs`` as :func:`survey` gives them.

    Examples
    --------
    >>> Surveyed.from_msg({"workers": [], "nodes": [], "blobs": []}).found["nodes"]
    []
    >>> Surveyed.from_msg({"workers": [], "nodes": "?"})
    Traceback (most recent call last):
    ...
    ValueError: a survey's nodes must be a list of dicts, not '?'
    """

    found: dict

    def to_msg(self) -> dict:
        return self.found

    @classmethod
    def from_msg(cls, msg: object) -> Surveyed:
        """The scheduler's answer, its shape checked; ValueError if it is not one."""
        if not isinstance(msg, dict):
            raise ValueError(f"a survey must be a dict, not {type(msg).__name__}")
        for key in ("workers", "nodes", "blobs"):
            rows = msg.get(key)
            if not isinstance(rows, list | tuple) or not all(
                isinstance(row, dict) for row in rows
            ):
                raise ValueError(
                    f"a survey's {key} must be a list of dicts, not {rows!r}"
                )
        return cls(msg)


@dataclass(frozen=True)
class Unreachable:
    """A nanny that gave no status: why (timed out, gone, an invalid reply)."""

    why: str


async def survey(
    rpc: Callable,
    identity: dict,
    registry: dict,
    timeout: float | None = None,
    concurrency: int = CONCURRENCY,
) -> dict:
    """Ask every nanny of ``identity`` for its state and merge it with ``registry``.

    Parameters
    ----------
    rpc : callable
        ``rpc(address)`` gives an object whose ``envship_status`` calls that
        nanny: ``client.rpc`` or ``scheduler.rpc``.
    identity : dict
        The scheduler's ``identity()`` (its ``workers``: address -> ``nanny``,
        ``name``).
    registry : dict
        The registry's ``snapshot()``, or ``EMPTY_REGISTRY``.
    timeout : float, optional
        Seconds each nanny has to answer; one that does not is shown as
        ``unreachable``, and so is one whose reply is not a valid status.
    concurrency : int
        How many nannies are asked at once (the others wait their turn).

    Returns
    -------
    dict
        ``workers``, ``nodes`` and ``blobs``: lists of dicts, as described by
        :class:`envship.ClusterStatus`. A worker whose nanny did not answer
        has ``node`` None and the reason in ``unreachable``.

    Examples
    --------
    >>> found = await survey(scheduler.rpc, scheduler.identity(),
    ...                      registry.snapshot(), timeout=3)  # doctest: +SKIP
    >>> [w["environment"] for w in found["workers"]]  # doctest: +SKIP
    ['sklearn-dev', 'sklearn-dev']
    """
    workers = {
        w["nanny"]: (address, worker_identity(w["name"], address, w["nanny"]))
        for address, w in identity["workers"].items()
        if w.get("nanny")
    }

    slots = asyncio.Semaphore(concurrency)

    async def ask(nanny: str) -> NannyStatus | Unreachable:
        try:
            async with slots:
                reply = await asyncio.wait_for(
                    rpc(nanny).envship_status(**Status(cache=True).to_msg()), timeout
                )
        except asyncio.TimeoutError:
            return Unreachable(f"timed out after {timeout} s")
        except Exception as e:  # no envship there, or gone
            return Unreachable(str(e) or type(e).__name__)
        try:
            return NannyStatus.from_msg(reply)
        except (ValueError, TypeError) as e:  # another version, or a liar
            return Unreachable(f"invalid status reply: {e}")

    answers = dict(zip(workers, await asyncio.gather(*map(ask, workers)), strict=True))
    ordered = sorted(workers.items(), key=lambda kv: str(kv[1][1]))
    return {
        "workers": [
            _worker_row(nanny, address, name, answers[nanny])
            for nanny, (address, name) in ordered
        ],
        "nodes": _node_rows(answers[nanny] for nanny, _ in ordered),
        "blobs": _blob_rows(registry, answers),
    }


def survey_key(identity: dict, registry: dict) -> Hashable:
    """What a survey depends on besides the nannies' answers: when it is equal,
    a survey gathered a moment ago is still the one to show.

    The workers (address, nanny, name: a restarted worker has a new address)
    and the registry's state (what each nanny runs since when, who holds
    what), not the heartbeat figures that ``identity`` carries too.

    Examples
    --------
    >>> one = {"workers": {"tcp://w:1": {"nanny": "tcp://n:1", "name": "a",
    ...                                  "last_seen": 1.0}}}
    >>> two = {"workers": {"tcp://w:1": {"nanny": "tcp://n:1", "name": "a",
    ...                                  "last_seen": 2.0}}}
    >>> survey_key(one, EMPTY_REGISTRY) == survey_key(two, EMPTY_REGISTRY)
    True
    """
    workers = tuple(
        sorted(
            (address, str(w.get("nanny")), str(w.get("name")))
            for address, w in identity["workers"].items()
        )
    )
    return workers, repr(sorted(registry.items()))


class SharedSurvey:
    """One gathering shared among the callers that ask about the same state.

    A caller whose key (:func:`survey_key`) equals that of the last
    gathering, ended less than ``max_age`` seconds ago, gets its result; one
    whose key equals that of a gathering under way waits for it; anyone else
    starts a new gathering. One per scheduler (the dashboard) or per client
    (``envship.status``); used from that one's event loop.

    Parameters
    ----------
    max_age : float
        Seconds a result is shared at least.
    cpu_share : float, optional
        The most of a core that gathering may take: a result is shared for
        at least the CPU seconds its gathering took (this process's, all of
        them while it ran) over ``cpu_share``. The scheduler's page, at a
        thousand nodes, is gathered every few seconds however many look at it.
    serve_stale : bool
        A caller whose key is that of the last result, older than the above,
        gets that result at once while a new one is gathered for the next
        callers (a page that reloads itself): nobody waits on the nannies
        unless the workers or the registry changed.

    Examples
    --------
    >>> import asyncio
    >>> shared, calls = SharedSurvey(max_age=60), []
    >>> async def gather():
    ...     calls.append(1)
    ...     await asyncio.sleep(0.01)
    ...     return {"workers": []}
    >>> async def twice():
    ...     await asyncio.gather(shared.get("k", gather), shared.get("k", gather))
    ...     return await shared.get("k", gather)
    >>> asyncio.run(twice()), len(calls)
    ({'workers': []}, 1)
    """

    def __init__(
        self,
        max_age: float = SHARE_SECONDS,
        cpu_share: float | None = None,
        serve_stale: bool = False,
    ) -> None:
        self.max_age = max_age
        self.cpu_share = cpu_share
        self.serve_stale = serve_stale
        self._running: asyncio.Future | None = None
        self._running_key: Hashable = None
        self._result: Any = None
        self._result_key: Hashable = None
        self._ended = -math.inf
        self._shared_for = max_age
        #: Gatherings started, for tests and benchmarks.
        self.gathered = 0

    async def get(self, key: Hashable, gather: Callable[[], Awaitable[Any]]) -> Any:
        """The result of ``gather()`` for ``key``: shared, or gathered now."""
        have = self._result_key == key and self._ended > -math.inf
        if have and time.monotonic() - self._ended < self._shared_for:
            return self._result
        if self._running is None or self._running_key != key:
            self._running_key = key
            self._running = asyncio.ensure_future(self._gather(gather))
            self._running.add_done_callback(_retrieve)
        if have and self.serve_stale:
            return self._result
        # Shielded: a caller that goes away (a page closed) stops no one else.
        return await asyncio.shield(self._running)

    async def settled(self) -> None:
        """Wait for the gathering under way, if any (errors are its callers')."""
        if self._running is not None:
            await asyncio.wait([self._running])

    async def _gather(self, gather: Callable[[], Awaitable[Any]]) -> Any:
        self.gathered += 1
        me, key = asyncio.current_task(), self._running_key
        cpu = time.process_time()
        try:
            result = await gather()
        finally:
            latest = self._running is me  # else a newer gathering took over
            if latest:
                self._running = None
        if latest:
            self._result, self._result_key = result, key
            self._ended = time.monotonic()
            self._shared_for = self.max_age
            if self.cpu_share:
                took = time.process_time() - cpu
                self._shared_for = max(self.max_age, took / self.cpu_share)
        return result


def _retrieve(future: asyncio.Future) -> None:
    # Its callers see the error; if all of them went away, nobody logs it.
    if not future.cancelled():
        future.exception()


def _worker_row(
    nanny: str, address: str, name: Any, answer: NannyStatus | Unreachable
) -> dict:
    if isinstance(answer, Unreachable):
        return {
            "name": name,
            "address": address,
            "nanny": nanny,
            "node": None,
            "site": None,
            "environment": None,
            "id": None,
            "since": None,
            "unreachable": answer.why,
        }
    return {
        "name": name,
        "address": address,
        "nanny": nanny,
        "node": answer.node,
        "site": answer.site,
        "environment": answer.name,
        "id": answer.running,
        "since": answer.since,
        "unreachable": None,
    }


def _node_rows(answers: Iterable[NannyStatus | Unreachable]) -> list[dict]:
    nodes: dict[str, dict] = {}
    zygotes: dict[str, dict[int, ZygoteState]] = collections.defaultdict(dict)
    for s in answers:
        if isinstance(s, NannyStatus):
            n = nodes.setdefault(
                s.node,
                {
                    "node": s.node,
                    "site": s.site,
                    "nannies": 0,
                    "cache": s.cache_root,
                    "cache_size": s.cache_size,
                },
            )
            n["nannies"] += 1
            zygotes[s.node].update((z.pid, z) for z in s.zygotes)
    for node, n in nodes.items():
        # Nannies of one process share its zygotes: each is listed once.
        n["zygotes"] = [
            z.to_msg()
            for z in sorted(zygotes[node].values(), key=lambda z: (z.name, z.pid))
        ]
    return list(nodes.values())


def _blob_rows(
    registry: dict, answers: dict[str, NannyStatus | Unreachable]
) -> list[dict]:
    blobs = []
    for id, offer in registry["offers"].items():
        holders = registry["holders"].get(id, [])
        transfers = [
            {"nanny": nanny, **t.to_msg()}
            for nanny, s in answers.items()
            if isinstance(s, NannyStatus)
            for t in s.transfers
            if t.id == id
        ]
        thin_of = offer.get("thin_of")
        blobs.append(
            {
                "id": id,
                "name": offer["name"] + (" (thin pack)" if thin_of else ""),
                "thin_of": thin_of,
                "size": offer["size"],
                "complete": sum(h["complete"] for h in holders),
                "partial": sum(not h["complete"] for h in holders),
                "transfers": transfers,
            }
        )
    return blobs
