"""One download on a node: the pieces of one blob arriving from the client and peers.

A :class:`Download` holds what this node has of the blob (a bitmap of verified
pieces), what it knows of each peer (:class:`PeerState`) and the events the
fetch loop and the handlers wait on. Pieces go straight to a partial file that
the node cache names (``BlobStore.partial_path``); each is verified against the
blob's piece table before it is written, so a download that is interrupted
resumes from the pieces already there (:func:`resume`).

It makes no request itself: the fetch loop (``fetch.py``) does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from envship.errors import EnvshipError

from .choice import Crossers, Limits, end_request, peers_to_poll
from .messages import WaitAnswer
from .pieces import Offer, Peer, PieceTable

logger = logging.getLogger("envship.transfer")


@dataclass
class PeerState:
    """What this node knows of one peer for one download."""

    peer: Peer
    have: bytearray | None = None
    complete: bool = False
    in_flight: int = 0
    busy_until: float = 0.0
    dropped: str | None = None
    #: Whether this node asks it what it holds (``have``); the others it
    #: knows of (so that its site agrees on crossers) but does not ask.
    polled: bool = False
    poller: asyncio.Task | None = None


@dataclass
class Download:
    """The pieces of one blob arriving on one node, from the client and peers."""

    offer: Offer
    path: Path
    node_site: str | None
    #: The site the client seeds, if it seeds one: its nodes never fetch across.
    seed_site: str | None = None
    have: bytearray = field(init=False)
    received: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    #: The whole was refused as not the id it was offered as (``error`` says why).
    not_its_id: bool = False
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.have = bytearray(self.table.count)
        self.peers: dict[str, PeerState] = {}
        self.changed = asyncio.Event()  # wakes the fetch loop
        self.news = asyncio.Event()  # replaced on every new piece: for `have`
        self.opened = asyncio.Event()  # the partial file is ready for pieces
        self.done = asyncio.Event()
        self.in_flight: set[int] = set()
        #: Piece -> its requests in flight (when sent, to which peer).
        self.asked: dict[int, list[tuple[float, str]]] = {}
        #: Seconds a piece took lately (a moving average); None before one came.
        self.typical: float | None = None
        #: When the next request in flight becomes late (``choice.late_pieces``).
        self.late_at: float | None = None
        self.waiting_since: dict[int, float] = {}
        #: When the fetch loop may next poll more peers (``fetch.POLL_MORE_AFTER``).
        self.poll_more_at = 0.0
        #: Peers came or were dropped since the fetch loop chose whom to poll.
        self.poll_due = True
        self._crossers: Crossers | None = None
        #: Its request budgets (the fetch loop sets them for its piece size).
        self.limits = Limits(piece_timeout=30.0)
        self.fd: int | None = None

    @property
    def table(self) -> PieceTable:
        return self.offer.table

    @property
    def count(self) -> int:
        return sum(self.have)

    @property
    def complete(self) -> bool:
        return self.count == self.table.count

    def add_peers(self, peers: Iterable[Peer], me: str) -> None:
        for peer in peers:
            if peer.address != me and peer.address not in self.peers:
                self.peers[peer.address] = PeerState(peer)
                self.poll_due = True
                self._crossers = None
        self.changed.set()

    def drop(self, p: PeerState, reason: str) -> bool:
        """Ask ``p`` nothing more; False if it was dropped already."""
        if p.dropped is not None:
            return False
        p.dropped = reason
        self.poll_due = True  # another peer may be polled instead
        self._crossers = None
        return True

    def crossers(self, me: str) -> Crossers:
        """Who of ``me``'s site crosses for which piece (kept until peers change).

        Every live peer of the site counts, polled or not, so that the site
        agrees (:class:`.choice.Crossers`).
        """
        if self._crossers is None:
            ours = [
                a
                for a, p in self.peers.items()
                if p.peer.site == self.node_site and p.dropped is None
            ]
            self._crossers = Crossers(me, ours)
        return self._crossers

    def asking(self, index: int, address: str, now: float) -> None:
        """A request for piece ``index`` goes to ``address`` now."""
        self.in_flight.add(index)
        self.asked.setdefault(index, []).append((now, address))

    def answered(self, index: int, address: str, now: float, *, came: bool) -> None:
        """The request for ``index`` to ``address`` ended; ``came``: with the piece."""
        none_left, self.typical = end_request(
            self.asked, index, address, now, self.typical, came=came
        )
        if none_left:
            self.in_flight.discard(index)

    def poll_more(
        self, k: int, rng: random.Random, *, more: bool = False
    ) -> list[PeerState]:
        """Mark more peers to poll (:func:`.choice.peers_to_poll`); return them.

        Live peers up to ``k`` of each site (0: all), so a dropped one is
        replaced; ``k`` more of each site with ``more``.
        """
        live = [p for p in self.peers.values() if not p.dropped]
        polled = Counter(p.peer.site for p in live if p.polled)
        chosen = peers_to_poll(
            [p for p in live if not p.polled],
            polled,
            k,
            rng,
            site_of=lambda p: p.peer.site,
            more=more,
        )
        for p in chosen:
            p.polled = True
        return chosen

    def unavailable(self) -> list[int]:
        """Pieces that this node lacks and no live peer it would ask holds.

        Nodes of the seeded site ask only their own site: what only other
        sites hold is unavailable to them, and the client sends it again.
        """
        own_site_only = self.seed_site is not None and self.seed_site == self.node_site
        live = [
            p
            for p in self.peers.values()
            if not p.dropped and (not own_site_only or p.peer.site == self.node_site)
        ]
        return [
            i
            for i in range(self.table.count)
            if not self.have[i]
            and i not in self.in_flight
            and not any(p.complete or (p.have and p.have[i]) for p in live)
        ]

    def state(self) -> WaitAnswer:
        """For whoever waits: ``complete`` once the blob is in the node cache."""
        return WaitAnswer(
            complete=self.done.is_set() and self.error is None,
            error=self.error,
            not_its_id=self.not_its_id or None,
            have=self.count,
            count=self.table.count,
            received=dict(self.received),
            rejected=dict(self.rejected),
            dropped={a: p.dropped for a, p in self.peers.items() if p.dropped},
            unavailable=() if self.complete else tuple(self.unavailable()),
            polled=sum(1 for p in self.peers.values() if p.polled),
        )

    def bitmap(self) -> bytes:
        return bytes(self.have)

    async def accept(self, index: int, data, source: str) -> bool:
        """Verify and write one piece; False (and a strike) if it is bad."""
        data = bytes(data) if not isinstance(data, bytes) else data
        if self.have[index]:
            return True
        if not self.table.verify(index, data):
            self.rejected[source] = self.rejected.get(source, 0) + 1
            logger.warning(
                "envship: piece %d of %s from %s failed verification",
                index,
                self.offer.name,
                source,
            )
            return False
        offset, _ = self.table.span(index)
        if self.fd is None:  # the handlers and the fetch loop never get here
            raise RuntimeError(f"the download of {self.offer.name} has ended")
        try:
            await asyncio.to_thread(_pwrite_all, self.fd, data, offset)
        except OSError as e:
            raise disk_error(self, self.path.parent, e) from e
        if not self.have[index]:
            self.have[index] = 1
            self.received[source] = self.received.get(source, 0) + len(data)
            self.changed.set()
            news, self.news = self.news, asyncio.Event()
            news.set()
        return True


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def resume(download: Download, fd: int) -> None:
    """Mark the pieces a previous, interrupted download wrote to ``fd``."""
    size = os.fstat(fd).st_size
    table = download.table
    for i in range(table.count):
        offset, length = table.span(i)
        if offset + length > size:
            break
        if table.verify(i, os.pread(fd, length, offset)):
            download.have[i] = 1
            download.received["disk"] = download.received.get("disk", 0) + length


def disk_error(download: Download, root: Path, e: OSError) -> EnvshipError:
    return EnvshipError(
        download.offer.name,
        f"could not write its archive into this node's cache {root}: {e}",
        "free disk space on the node, or set envship.cache.directory to a larger disk",
    )
