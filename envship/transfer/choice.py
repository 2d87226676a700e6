"""Piece choice: which pieces a fetching node asks for now, and from which peers.

A pure function of plain data: what this node holds and has asked for, what
it knows of each peer, the time and the limits in, the requests to make out.
No asyncio, no I/O, no clock and no global random state (the caller passes a
``random.Random``), so a simulator can drive it as the fetch loop does
(``envship.transfer.fetch``).

The rules:

- Rarest first: pieces that fewer usable peers hold are asked for first
  (ties in random order, so that nodes do not all ask for the same piece).
- Budgets: at most ``Limits.total`` requests in flight in all and
  ``Limits.per_peer`` per peer; each request goes to the candidate with the
  fewest in flight.
- A dropped peer is never asked; a busy one not before its ``busy_until``.
- A piece asked of one peer for much longer than a piece takes
  (:func:`late_pieces`: a slow node, or one whose link is queued up) is asked
  of another peer of the same site that holds it too; whichever answers
  first is kept.
- Sites: a node with a site label asks peers of its own site when any of them
  holds the piece. Else, for each piece, one node of the site fetches it
  from another site, "the crosser": the first of a ranking of the site's
  live nodes by a hash of the piece and their address, the same on every
  node (:class:`Crossers`). The others wait for it; if the piece has not
  reached the site after a piece timeout (the crosser died, and the nodes
  that do not poll it cannot know), the second of the ranking crosses too,
  after two the third, and so on. Nodes of the site the client seeds
  (``seed_site``) never cross before a piece timeout: the client sends them
  every piece.

Which peers a node polls for their pieces is chosen here too
(:func:`peers_to_poll`): a random few of each site, as a BitTorrent tracker
hands out, so that the messages of a node do not grow with the cluster; a
few more when no peer it polls holds what it lacks.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import xxhash

#: Requests a fetching node keeps in flight, in all and per peer (the least
#: :meth:`Limits.for_pieces` gives; at most MAX_REQUESTS in all).
REQUESTS_IN_FLIGHT = 6
REQUESTS_PER_PEER = 2
MAX_REQUESTS = 24
#: Bytes of pieces a fetching node asks for at once
#: (``envship.transfer.in-flight``).
IN_FLIGHT_BYTES = 32 * 2**20
#: A peer that answered "busy" is left alone for this share of the time a
#: piece takes the node lately, and at least BUSY_BACKOFF seconds.
BUSY_FACTOR = 0.5
BUSY_BACKOFF = 0.05
#: A request is late after this many times the typical time of a piece, and
#: at least this many seconds.
LATE_FACTOR = 4.0
LATE_MIN = 0.05

#: One flag per piece, true when the piece is held (``bytes`` or ``bytearray``).
Bitmap = bytes | bytearray
#: Peers of each site a node polls at first (``envship.transfer.peers-polled``).
PEERS_POLLED = 24

P = TypeVar("P")


@dataclass(frozen=True)
class Limits:
    """The budgets of one fetching node, and how long it waits for a crosser."""

    #: Seconds a piece waits for its site's crosser, or for the client
    #: (``envship.transfer.piece-timeout``).
    piece_timeout: float
    total: int = REQUESTS_IN_FLIGHT
    per_peer: int = REQUESTS_PER_PEER
    #: How long a busy peer is left alone: see :meth:`busy_until`.
    busy_backoff: float = BUSY_BACKOFF
    busy_factor: float = BUSY_FACTOR
    #: A request is late after this many times the typical time of a piece
    #: (and at least ``late_min`` seconds): see :func:`late_pieces`.
    late_factor: float = LATE_FACTOR
    late_min: float = LATE_MIN

    @classmethod
    def for_pieces(
        cls, piece_timeout: float, piece_size: int, in_flight: int = IN_FLIGHT_BYTES
    ) -> Limits:
        """The budgets for pieces of ``piece_size``: ``in_flight`` bytes at once.

        Within REQUESTS_IN_FLIGHT and MAX_REQUESTS requests, a sixth of them
        (REQUESTS_PER_PEER at least) to any one peer. Small pieces from
        peers whose links are shared by many askers come slowly each: a node
        asks for more of them at once, of more peers, to fill its own link.

        Examples
        --------
        >>> limits = Limits.for_pieces(30, 256 * 2**10)
        >>> limits.total, limits.per_peer
        (24, 4)
        >>> limits = Limits.for_pieces(30, 4 * 2**20)
        >>> limits.total, limits.per_peer
        (8, 2)
        """
        total = min(MAX_REQUESTS, max(REQUESTS_IN_FLIGHT, in_flight // piece_size))
        per_peer = max(REQUESTS_PER_PEER, total // 6)
        return cls(piece_timeout, total=total, per_peer=per_peer)

    def busy_until(self, now: float, typical: float | None) -> float:
        """Until when to leave alone a peer that answered "busy" at ``now``.

        A share of the time a piece takes lately (``typical``): its serve
        slots free up at about that pace.

        Examples
        --------
        >>> Limits(30).busy_until(10.0, 2.0), Limits(30).busy_until(10.0, None)
        (11.0, 10.05)
        """
        return now + max(self.busy_backoff, self.busy_factor * (typical or 0.0))


@dataclass(frozen=True)
class PeerView:
    """What the fetching node knows of one peer at the time of choosing."""

    address: str
    site: str | None = None
    #: The pieces it is known to hold; None if it has said nothing yet.
    have: Bitmap | None = None
    complete: bool = False
    #: Requests to it in flight now.
    in_flight: int = 0
    busy_until: float = 0.0
    dropped: bool = False

    def holds(self, index: int) -> bool:
        return self.complete or (self.have is not None and bool(self.have[index]))


@dataclass(frozen=True)
class NodeView:
    """The fetching node: who it is, what it holds and what it waits for."""

    address: str
    have: Bitmap
    site: str | None = None
    #: The site the client seeds, if it seeds one.
    seed_site: str | None = None
    #: Pieces asked for and not answered yet.
    in_flight: frozenset[int] = frozenset()
    #: Piece -> when it was first seen only at other sites (from the last Choice).
    waiting_since: Mapping[int, float] = field(default_factory=dict)
    #: Pieces in flight whose request is late (:func:`late_pieces`) -> the
    #: peers asked: they are asked of another peer.
    late: Mapping[int, frozenset[str]] = field(default_factory=dict)
    #: Who of its site crosses for which piece. None: ranked from the peers
    #: given to :func:`choose`, which then must include every live peer of
    #: the site it knows (a node of thousands keeps one :class:`Crossers`
    #: while its peers do not change, and passes only the peers it polls).
    crossers: Crossers | None = None


class Crossers:
    """Who of a site fetches each piece from other sites: a ranking per piece.

    ``nodes``: the live nodes of ``me``'s site that it knows, itself
    included. Each piece ranks them by a hash of the piece's index and
    their address (rendezvous hashing): every node of the site ranks alike,
    though each knows a different few alive, and a node that dies changes
    the first of only the pieces it was first for.

    Examples
    --------
    >>> east = ["a", "b", "c", "d"]
    >>> [Crossers("a", east).first(i) for i in range(8)]
    ['b', 'b', 'c', 'c', 'b', 'd', 'a', 'a']
    >>> [n for n in east if Crossers(n, east).among_first(5, 2)]  # first two of 5
    ['b', 'd']
    >>> Crossers("a", ["a", "b", "c"]).first(5)  # "a" knows that "d" died
    'b'
    """

    __slots__ = ("me", "nodes", "_scans")

    def __init__(self, me: str, nodes: Iterable[str]):
        self.me = me
        self.nodes = tuple(dict.fromkeys([me, *nodes]))
        #: Piece -> (nodes scanned, how many of them rank before ``me``).
        self._scans: dict[int, tuple[int, int]] = {}

    def first(self, index: int) -> str:
        """The node that crosses for piece ``index``."""
        return max(self.nodes, key=lambda a: (_rank(a, index), a))

    def among_first(self, index: int, k: int) -> bool:
        """Whether ``me`` is among the ``k`` first for piece ``index``.

        Scans the nodes only until ``k`` rank before ``me`` (few, for all but
        the first few of a piece), and goes on from there when asked for a
        larger ``k``.
        """
        mine = (_rank(self.me, index), self.me)
        scanned, before = self._scans.get(index, (0, 0))
        nodes = self.nodes
        while before < k and scanned < len(nodes):
            a = nodes[scanned]
            if (_rank(a, index), a) > mine:
                before += 1
            scanned += 1
        self._scans[index] = (scanned, before)
        return before < k


def _rank(address: str, index: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{index} {address}".encode())


class Request(NamedTuple):
    """Ask ``peer`` (an address) for ``piece`` (its index)."""

    piece: int
    peer: str


@dataclass(frozen=True)
class Choice:
    """The requests to make now, and the node's ``waiting_since`` from now on."""

    requests: tuple[Request, ...]
    waiting_since: dict[int, float]


def choose(
    node: NodeView,
    peers: Sequence[PeerView],
    now: float,
    rng: random.Random,
    limits: Limits,
) -> Choice:
    """The requests ``node`` makes now: rarest pieces first, spread over ``peers``.

    Deterministic given its inputs; it changes none of them.

    Examples
    --------
    Piece 1 is rarer than piece 0 (one holder against two), so it comes first:

    >>> node = NodeView("me", have=bytes(3), in_flight=frozenset({2}))
    >>> a = PeerView("a", have=bytes([1, 1, 0]))
    >>> b = PeerView("b", have=bytes([1, 0, 0]))
    >>> choose(node, [a, b], 0.0, random.Random(0), Limits(piece_timeout=30)).requests
    (Request(piece=1, peer='a'), Request(piece=0, peer='b'))
    """
    waiting_since = dict(node.waiting_since)
    budget = limits.total - len(node.in_flight)
    if budget <= 0:
        return Choice((), waiting_since)
    in_flight = {p.address: p.in_flight for p in peers}
    live = [
        p
        for p in peers
        if not p.dropped and p.in_flight < limits.per_peer and p.busy_until <= now
    ]
    if not live:
        return Choice((), waiting_since)
    late = node.late
    needed = [
        i
        for i in range(len(node.have))
        if not node.have[i] and (i not in node.in_flight or i in late)
    ]
    rng.shuffle(needed)
    # Only peers that said what they hold can be candidates.
    sources = [p for p in live if p.complete or p.have is not None]
    holders = {
        i: [p for p in sources if p.complete or p.have[i]]  # type: ignore[index]
        for i in needed
    }
    needed.sort(key=lambda i: len(holders[i]) or 1 << 30)
    crossers = _crossers(node, peers)
    chosen: list[Request] = []
    for i in needed:
        asked = late.get(i)
        candidates = [
            p
            for p in _by_site(node, i, holders[i], crossers, waiting_since, now, limits)
            if in_flight[p.address] < limits.per_peer
            # A late piece: of another peer of its own site only (the link
            # between sites is slow by nature, not a reason to cross twice).
            and (asked is None or (p.address not in asked and p.site == node.site))
        ]
        if not candidates:
            continue
        peer = min(candidates, key=lambda p: (in_flight[p.address], rng.random()))
        in_flight[peer.address] += 1
        chosen.append(Request(i, peer.address))
        if len(chosen) >= budget:
            break
    return Choice(tuple(chosen), waiting_since)


def late_pieces(
    asked: Mapping[int, Sequence[tuple[float, str]]],
    now: float,
    typical: float | None,
    limits: Limits,
) -> tuple[dict[int, frozenset[str]], float | None]:
    """The pieces whose one request is late, and when the next one will be.

    ``asked`` maps each piece in flight to its requests (when sent, to
    which peer); ``typical`` is how long a piece takes this node lately
    (None: none came yet, so nothing is late). Late: asked of one peer only,
    ``late_factor`` times ``typical`` ago (``late_min`` at least). A piece
    asked twice is never asked a third time.

    Examples
    --------
    >>> limits = Limits(piece_timeout=30)
    >>> late_pieces({0: [(0.0, "slow")], 1: [(0.9, "a")]}, 1.0, 0.1, limits)
    ({0: frozenset({'slow'})}, 1.3)
    """
    if typical is None:
        return {}, None
    after = max(limits.late_factor * typical, limits.late_min)
    late: dict[int, frozenset[str]] = {}
    upcoming: float | None = None
    for index, requests in asked.items():
        if len(requests) != 1:
            continue
        sent, peer = requests[0]
        if now - sent > after:
            late[index] = frozenset({peer})
        elif upcoming is None or sent + after < upcoming:
            upcoming = sent + after
    return late, upcoming


def end_request(
    asked: dict[int, list[tuple[float, str]]],
    index: int,
    address: str,
    now: float,
    typical: float | None,
    *,
    came: bool,
) -> tuple[bool, float | None]:
    """Forget the request for ``index`` to ``address`` in ``asked``, as it ended.

    Returns whether no request for ``index`` is left, and ``typical``
    updated (a moving average) if ``came``: the piece came with it, first.

    Examples
    --------
    >>> asked = {0: [(1.0, "a"), (2.0, "b")]}
    >>> end_request(asked, 0, "b", 2.5, None, came=True)
    (False, 0.5)
    >>> end_request(asked, 0, "a", 9.0, 0.5, came=False), asked
    ((True, 0.5), {})
    """
    requests = asked.get(index, [])
    for request in requests:
        if request[1] == address:
            requests.remove(request)
            if came:
                took = now - request[0]
                typical = took if typical is None else 0.8 * typical + 0.2 * took
            break
    if requests:
        return False, typical
    asked.pop(index, None)
    return True, typical


def crosser(node: NodeView, peers: Sequence[PeerView], index: int) -> str | None:
    """The node of ``node``'s site that fetches piece ``index`` from other sites first.

    None when ``node`` has no site. Stable while the site's nodes live: those
    that complete stay in the choice.

    Examples
    --------
    >>> node = NodeView("b", have=bytes(4), site="east")
    >>> peers = [PeerView("a", site="east"), PeerView("c", site="west")]
    >>> [crosser(node, peers, i) for i in range(8)]
    ['b', 'b', 'b', 'b', 'b', 'b', 'a', 'a']
    """
    crossers = _crossers(node, peers)
    return None if crossers is None else crossers.first(index)


def _crossers(node: NodeView, peers: Sequence[PeerView]) -> Crossers | None:
    """``node.crossers``, or ranked from the live ``peers`` of its site."""
    if node.site is None:
        return None
    if node.crossers is not None:
        return node.crossers
    ours = [p.address for p in peers if p.site == node.site and not p.dropped]
    return Crossers(node.address, ours)


def _by_site(
    node: NodeView,
    index: int,
    holders: list[PeerView],
    crossers: Crossers | None,
    waiting_since: dict[int, float],
    now: float,
    limits: Limits,
) -> list[PeerView]:
    """Peers of this site first; another site's only when none of ours will do.

    Records in ``waiting_since`` since when ``index`` is held only elsewhere.
    """
    if node.site is None:
        return holders
    ours = [p for p in holders if p.site == node.site]
    if ours:
        waiting_since.pop(index, None)
        return ours
    if not holders:
        return holders
    waited = now - waiting_since.setdefault(index, now)
    if node.seed_site == node.site:
        # The client sends our site every piece: a piece seen elsewhere
        # first is only our view of our peers lagging behind.
        return holders if waited > limits.piece_timeout else []
    # Only one node of our site fetches each piece across sites; the others
    # wait for it. A slow link between sites makes each piece slow to come:
    # not a reason to fetch it twice. A piece timeout later the next of the
    # ranking crosses too (the first may have died unseen), and so on.
    timeouts = int(waited / limits.piece_timeout) if limits.piece_timeout > 0 else 0
    if crossers is None or crossers.among_first(index, 1 + timeouts):
        return holders
    return []


def peers_to_poll(
    unpolled: Sequence[P],
    polled_per_site: Mapping[str | None, int],
    k: int,
    rng: random.Random,
    *,
    site_of=lambda peer: peer.site,
    more: bool = False,
) -> list[P]:
    """Which of the live peers a node knows and does not poll yet to poll now.

    Enough of each site for ``k`` polled (``polled_per_site`` counts the
    live ones polled already), chosen at random; with ``more`` (no polled
    peer holds pieces the node lacks), ``k`` more of each site. ``k`` 0:
    every one. ``site_of`` gives a peer's site (default: its ``site``).

    Examples
    --------
    >>> rng = random.Random(0)
    >>> peers = [PeerView(f"tcp://n{i}:1") for i in range(10)]
    >>> len(peers_to_poll(peers, {}, 3, rng))
    3
    >>> peers_to_poll(peers, {None: 3}, 3, rng)
    []
    >>> len(peers_to_poll(peers, {None: 3}, 3, rng, more=True))
    3
    """
    if not k:
        return list(unpolled)
    by_site: dict[str | None, list[P]] = {}
    for peer in unpolled:
        by_site.setdefault(site_of(peer), []).append(peer)
    chosen: list[P] = []
    for site, peers in by_site.items():
        want = k if more else max(0, k - polled_per_site.get(site, 0))
        chosen += peers if len(peers) <= want else rng.sample(peers, want)
    return chosen
