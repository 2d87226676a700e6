"""Survey a cluster: what every worker runs in, each node's cache, each blob.

Written once for both readers: the client's ``envship.status`` (through
``client.rpc``) and the scheduler's dashboard page (through
``scheduler.rpc``). It asks every nanny for its ``envship_status``, each with a
timeout, so a nanny that died or hangs costs one timeout, never the answer.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from envship.identity import worker_identity
from envship.messages import NannyStatus, Status, ZygoteState

#: What a survey uses when the scheduler has no registry yet (nobody switched).
EMPTY_REGISTRY: dict[str, dict] = {"offers": {}, "holders": {}, "running": {}}


@dataclass(frozen=True)
class Unreachable:
    """A nanny that gave no status: why (timed out, gone, an invalid reply)."""

    why: str


async def survey(
    rpc: Callable, identity: dict, registry: dict, timeout: float | None = None
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

    async def ask(nanny: str) -> NannyStatus | Unreachable:
        try:
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
