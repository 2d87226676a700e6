"""The client side of transfers: seed a blob, follow the nodes until they hold it.

The client pushes each piece once, round robin, to the nodes that fetch, while
they pass pieces on to each other (see :mod:`envship.transfer.fetch`). A piece
that no live node holds is pushed again, to one node that lacks it.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .messages import OfferRequest, Put, Wait, WaitAnswer
from .pieces import Offer, Peer

#: Pieces the client pushes at once (over all nodes).
PUSH_SLOTS = 6
#: Seconds before the client pushes a piece again that it pushed again
#: already: once to one node that lacks it, the others then fetch it there.
REPUSH_AFTER = 2.0


# -- the client side: seeding ------------------------------------------------------


class FailureKind(enum.Enum):
    """Why a node did not get a blob."""

    #: The node died or left the cluster (its connection broke).
    LOST = "lost"
    #: It refused to start the transfer, or refused a piece (its disk, say).
    REFUSED = "refused"
    #: Its download failed: no live source of some pieces, a local error.
    ERROR = "error"
    #: It got every piece, and the whole was not the id it was offered as.
    NOT_ITS_ID = "not its id"


@dataclass(frozen=True)
class ShipFailure:
    """A node that did not get a blob: the kind of failure, and what happened.

    Examples
    --------
    >>> failure = ShipFailure(FailureKind.LOST, "lost during the transfer: EOF")
    >>> failure.kind is FailureKind.LOST, str(failure)
    (True, 'lost during the transfer: EOF')
    """

    kind: FailureKind
    why: str

    def __str__(self) -> str:
        return self.why


@dataclass
class ShipReport:
    """What a broadcast moved: bytes the client sent, and per node where bytes came from."""

    client_bytes: int = 0
    nodes: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, ShipFailure] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # workers not switched

    def merge(self, other: ShipReport) -> None:
        """Add what another broadcast of the same call moved."""
        self.client_bytes += other.client_bytes
        self.nodes.update(other.nodes)
        self.failed.update(other.failed)
        self.left_out.extend(other.left_out)

    def crossing(self, sites: dict[str, str | None], client_site: str | None) -> int:
        """Bytes that nodes received from a source of another site."""
        total = 0
        for nanny, state in self.nodes.items():
            for source, nbytes in state.get("received", {}).items():
                site = client_site if source == "client" else sites.get(source)
                if source != "disk" and site != sites.get(nanny):
                    total += nbytes
        return total


async def broadcast(
    rpc,
    path: str | os.PathLike,
    offer: Offer,
    fetchers: list[Peer],
    holders: Iterable[Peer] = (),
    *,
    peer_to_peer: bool = True,
    client_site: str | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
) -> ShipReport:
    """Make every nanny of ``fetchers`` hold the blob at ``path``.

    The client pushes each piece once, round robin over the fetchers (every
    piece to every fetcher when not ``peer_to_peer``, as a plain push would),
    while the fetchers pull the rest from each other and from ``holders``.
    A piece that a node finds no live peer for, twice a second apart, is
    pushed again: to one such node every ``REPUSH_AFTER`` seconds, and the
    others fetch it from there.

    Parameters
    ----------
    rpc : callable
        A connection pool, such as ``client.rpc``.
    fetchers : list of Peer
        One nanny per node that lacks the blob.
    holders : list of Peer
        Nannies that hold the complete blob already.
    client_site : str, optional
        The client's own site: it seeds only the nodes of that site, if it has
        any, so that each other site gets the blob across its link once,
        from its peers, and sends nothing back.
    on_progress : callable
        Called with the number of pieces (summed over nodes) now held.

    Returns
    -------
    ShipReport
        ``failed`` names the nannies that could not get the blob and why
        (a :class:`ShipFailure` each).
    """
    table = offer.table
    holders = list(holders)
    report = ShipReport()
    seeds = [p for p in fetchers if p.site is not None and p.site == client_site]
    seed_site = client_site if seeds and peer_to_peer else None
    peers = tuple(fetchers + holders) if peer_to_peer else ()
    request = OfferRequest(offer, peers, seed_site).to_msg()

    async def start(peer: Peer) -> None:
        await rpc(peer.address).envship_offer(**request)

    alive: list[Peer] = []
    for peer, outcome in zip(
        fetchers,
        await asyncio.gather(*map(start, fetchers), return_exceptions=True),
        strict=True,
    ):
        if isinstance(outcome, BaseException):
            reason = getattr(outcome, "problem", None) or str(outcome)
            report.failed[peer.address] = ShipFailure(
                FailureKind.REFUSED, f"could not start the transfer: {reason}"
            )
        else:
            alive.append(peer)

    async def push(peer: Peer, index: int, f) -> None:
        offset, length = table.span(index)
        data = await asyncio.to_thread(_pread_fd, f, offset, length)
        put = Put(offer.id, table.digest, index, data)
        await rpc(peer.address).envship_put(**put.to_msg())
        report.client_bytes += length

    lost: set[str] = set()  # nannies gone, or that refused: pushed no more

    def give_up(peer: Peer, error: Exception) -> None:
        lost.add(peer.address)
        if isinstance(error, OSError):  # the connection: the nanny is gone
            failure = ShipFailure(
                FailureKind.LOST, f"lost during the transfer: {error}"
            )
        else:  # the nanny refused the piece (its disk, say)
            failure = ShipFailure(
                FailureKind.REFUSED,
                getattr(error, "problem", None) or f"{type(error).__name__}: {error}",
            )
        report.failed.setdefault(peer.address, failure)

    async def seed(f) -> None:
        if holders and peer_to_peer:
            return  # nodes that hold it already seed the others
        slots = asyncio.Semaphore(PUSH_SLOTS)
        seeds = [p for p in alive if seed_site and p.site == seed_site] or alive
        plan = (
            [(seeds[i % len(seeds)], i) for i in range(table.count)]
            if peer_to_peer
            else [(p, i) for i in range(table.count) for p in alive]
        )

        async def one(peer, index):
            async with slots:
                if peer.address in lost:
                    return
                try:
                    await push(peer, index, f)
                except Exception as e:
                    give_up(peer, e)

        await asyncio.gather(*(one(p, i) for p, i in plan))

    held = {p.address: 0 for p in alive}
    repushed: dict[int, float] = {}  # piece -> when it was last pushed again

    async def follow(peer: Peer, f) -> None:
        """Wait for ``peer`` to complete; push what no live node holds."""
        stuck = 0
        wait = Wait(offer.id, table.digest, timeout=1.0).to_msg()
        while peer.address not in lost:
            try:
                state = WaitAnswer.from_msg(
                    await rpc(peer.address).envship_wait(**wait)
                )
            except Exception as e:  # gone, or an invalid answer (ValueError)
                give_up(peer, e)
                return
            held[peer.address] = (
                table.count
                if state.complete or state.have is None
                else min(state.have, table.count)
            )
            on_progress(sum(held.values()))
            if state.complete:
                report.nodes[peer.address] = state.to_msg()
                return
            if state.error:
                kind = FailureKind.NOT_ITS_ID if state.not_its_id else FailureKind.ERROR
                report.failed[peer.address] = ShipFailure(kind, state.error)
                return
            missing = [i for i in state.unavailable or () if i < table.count]
            stuck = stuck + 1 if missing and seeding.done() else 0
            if stuck >= 2:
                for index in missing:
                    now = time.monotonic()
                    if now - repushed.get(index, -REPUSH_AFTER) < REPUSH_AFTER:
                        continue  # another node got it a moment ago
                    repushed[index] = now
                    try:
                        await push(peer, index, f)
                    except Exception as e:
                        give_up(peer, e)
                        return
                stuck = 0

    if not alive:
        return report
    with open(path, "rb") as f:
        seeding = asyncio.ensure_future(seed(f))
        await asyncio.gather(seeding, *(follow(p, f) for p in alive))
    return report


def _pread_fd(f, offset: int, length: int) -> bytes:
    return os.pread(f.fileno(), length, offset)
