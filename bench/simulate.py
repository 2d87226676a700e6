"""Simulation: shipping one artifact to thousands of nodes, decided by envship's own piece choice.

A discrete-event simulation (a heap of timed events, no threads, no sockets)
of one broadcast as ``envship.transfer`` runs it, in which every fetching
node's decisions (which piece, from which peer, when to fetch across sites,
who crosses) come from :func:`envship.transfer.choice.choose`, called with
the same :class:`NodeView` and :class:`PeerView` the fetch loop builds
(``envship/transfer/fetch.py``), not from a copy of it::

    python bench/simulate.py --nodes 1000 [--sites 2] [--slow-factor 10]
        [--die 0.01] [--late 0.1] [--size 256MB] [--peers 24] [--json out.json]
    python bench/simulate.py --small           # 2, 8 and 64 nodes, seconds (CI)
    python bench/simulate.py --full            # 200, 1,000, 5,000 nodes (15 min)
    python bench/simulate.py --validate real.json

What is modelled, after the real code:

- The client (at site 0) pushes each piece once, round robin over the nodes
  of its own site (all nodes with one site), ``PUSH_SLOTS`` at once
  (``seed.py``); once it has pushed all, it asks every node each second for
  the pieces no live peer it knows holds (``Download.unavailable``) and after
  two such answers in a row pushes them (``seed.follow``), each piece to one
  node per ``REPUSH_AFTER`` seconds.
- Every node learns its peers from the client's offer (all fetchers) and
  long-polls each peer it polls for its bitmap (``have``: an answer per new
  piece, or after ``HAVE_WAIT`` without news). Which ones it polls is
  :func:`envship.transfer.choice.peers_to_poll`'s choice, as in the fetch
  loop: ``--peers K`` (``envship.transfer.peers-polled``, 24) of each site at
  random, and K more whenever no new piece came for ``POLL_MORE_AFTER`` and
  no polled peer holds a piece it lacks; the others stay known (so that
  every node of a site agrees on the crossers) but are never asked.
  ``--peers 0`` polls every peer, as the real code did before the bound.
- A node calls ``choose`` whenever something changed for it (a piece came,
  a request ended, a peer's bitmap changed, a peer was dropped, a piece
  timeout expired) and sends the requests it returns. A peer that dies is
  dropped when its connection breaks (one round trip); a piece that would
  take longer than ``envship.transfer.piece-timeout`` drops its peer then.
  Serving: a node sends ``--serve-slots`` pieces at once
  (``envship.transfer.serve-slots``: the real server holds a slot until the
  comm wrote the piece) and answers more askers "busy"; they leave it alone
  for half the time a piece takes them lately (``Limits.busy_until``). A node
  asks for ``--in-flight`` bytes of pieces at once (``Limits.for_pieces``).
- Cost: one site, 1,000 nodes take about 18 s and 5,000 about 2 min of one
  core; two sites 1.5 min at 1,000 and 10 min at 5,000 (a node keeps its
  ranking of crossers while its peers do not change, as the fetch loop
  does); ``--peers 0`` (every peer) about 25 times as long at 1,000 nodes.
- Links: every node has an upload and a download rate (``--rate``, one node
  ``--slow-node-factor`` times slower) and a one-way latency; each pair of
  sites is joined by one link per direction ``--slow-factor`` times slower
  than a node's, with ``--cross-latency``. A piece crosses the sender's
  uplink, the receiver's downlink and the site link. ``--links fifo`` (the
  default, fast): each link carries one piece at a time, first come first
  served, and a piece goes at the rate of the slowest. ``--links fair``: as
  TCP does, every link carries all the pieces on it at once, its rate
  shared among them max-min fairly (recomputed whenever a piece starts or
  ends: some 10x slower to simulate), and a request that the piece timeout
  ends is no longer sent. ``--wire-overhead``: bytes on the wire per byte
  of a piece (the links carry ``rate / overhead`` of pieces).
  ``bench/broadcast.py``'s real series is link-bound only with "fair"
  links: a node that holds the newest piece is asked for it by every other
  node at once, and serves them all together, not one after the other.
- ``--die`` of the nodes die at a uniform time within the first 90% of the
  ideal time (size / rate); ``--late`` join at a uniform time within it,
  learn the holders from the registry (``where``: every node that holds some
  of it), and ask it again when no peer they know holds what they lack.
  Nobody else knows them but later joiners.

Figures: ``seconds`` until every surviving node but the slow one holds the
artifact (late ones included; the slow node's own link bounds its own time,
so it is reported apart: ``slow_node_seconds`` against ``slow_node_floor``,
the artifact over its rate), ``seconds_at_2`` the same setup at 2 nodes (no
slow node, nobody dies or joins late), the client's bytes over the artifact,
the most bytes into one site from other sites over the artifact (0 with one
site: the client is in it), the most bytes one node served over the average,
the surviving nodes that completed over those alive, and the most messages a
node sent (requests and answers, not the long polls that time out without
news; ``peers_per_node_max``: the most peers a node exchanged messages with).

Validation (``--validate FILE``): simulated against measured seconds. The
file (``bench/broadcast.py`` writes its scaling series so)::

    {"nodes": [2, 8, 16, 32, 64], "seconds": [3.1, 3.4, ...],
     "link": {"rate": 100000000, "latency": 0.0002, "size": 268435456,
              "piece_size": 4194304, "peers": 0, "links": "fair",
              "wire_overhead": 1.045, "piece_timeout": 600}}

``link`` keys other than ``rate`` and ``size`` are optional (defaults as
here; ``peers`` as the real run polled, default 24; 0 for a series
measured before the bound, when every peer was polled). It prints both
series and the error of each; target within 15%.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import dask.utils
from dask.utils import parse_bytes

from envship import config
from envship.transfer.choice import (
    IN_FLIGHT_BYTES,
    PEERS_POLLED,
    Crossers,
    Limits,
    NodeView,
    PeerView,
    choose,
    crosser,
    end_request,
    late_pieces,
    peers_to_poll,
)
from envship.transfer.fetch import HAVE_WAIT, POLL_MORE_AFTER
from envship.transfer.pieces import piece_size as default_piece_size
from envship.transfer.seed import PUSH_SLOTS, REPUSH_AFTER

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import target_line  # noqa: E402

INF = math.inf
#: Seconds between the client's ``wait`` calls (seed.follow) and the checks
#: of a late node's fetch loop (Fetcher.fetch).
FOLLOW_EVERY = 1.0


@dataclass(frozen=True)
class Setup:
    """One simulated broadcast."""

    nodes: int
    sites: int = 1
    slow_factor: float = 10.0
    die: float = 0.0
    late: float = 0.0
    size: int = 256 * 2**20
    piece_size: int = 4 * 2**20
    #: Peers each node polls (of each site); 0: every peer it knows.
    peers: int = PEERS_POLLED
    rate: float = 100e6
    latency: float = 0.0002
    cross_latency: float = 0.002
    #: One node this many times slower (up and down); 0 or 1: none.
    slow_node_factor: float = 10.0
    seed: int = 0
    #: Pieces a node sends at once before it answers "busy"
    #: (``envship.transfer.serve-slots``); 0: no limit.
    serve_slots: int = 12
    #: Bytes of pieces a node asks for at once (``envship.transfer.in-flight``).
    in_flight: int = IN_FLIGHT_BYTES
    #: Seconds one turn of a node's fetch loop takes: what changes meanwhile
    #: is seen at the next turn (a choice among 48 peers of 64 pieces takes
    #: about 2 ms of Python).
    loop_gap: float = 0.002
    piece_timeout: float = 30.0
    stall_timeout: float = 30.0
    #: How a link carries the pieces that cross it at once: "fifo", one
    #: after the other at its full rate; "fair", all at once, each link's
    #: rate shared among them max-min fairly (as TCP connections share a
    #: bottleneck; each piece is its own request on its own connection).
    links: str = "fifo"
    #: Bytes on the wire per byte of a piece (TCP/IP and Ethernet headers,
    #: dask's framing): the links carry ``rate / wire_overhead`` of pieces.
    #: ``bench/broadcast.py`` measures it: the client link's bytes over the
    #: blob's.
    wire_overhead: float = 1.0


class Flow:
    """One piece crossing its links ("fair" links): bytes left, current rate."""

    __slots__ = ("links", "left", "rate", "done", "state")

    def __init__(self, links: list[tuple[int, float]], nbytes: int, done: tuple):
        self.links = links  # (link id, capacity in bytes/s)
        self.left = float(nbytes)
        self.rate = 0.0
        self.done = done  # (fn, *args), called when the last byte is sent
        self.state = "waiting"  # then "active", "finished" or "cancelled"


class Peer:
    """What one node knows of one peer (``download.PeerState``)."""

    __slots__ = ("id", "have", "complete", "in_flight", "busy_until", "dropped")

    def __init__(self, id: int):
        self.id = id
        self.have: bytearray | None = None
        self.complete = False
        self.in_flight = 0
        self.busy_until = 0.0
        self.dropped = False


class Node:
    __slots__ = (
        "id",
        "address",
        "site",
        "up",
        "down",
        "joins",
        "dies",
        "alive",
        "started",
        "have",
        "count",
        "in_flight",
        "waiting_since",
        "peers",
        "views",
        "crossers",
        "pollers",
        "up_free",
        "down_free",
        "served",
        "received",
        "sent",
        "talked",
        "done",
        "choose_at",
        "wake_at",
        "late",
        "stuck",
        "progress",
        "since",
        "seed_site",
        "known",
        "serving",
        "next_step",
        "tick_count",
        "asked",
        "typical",
        "repush",
    )

    def __init__(self, id: int, site: str | None, rate: float, pieces: int):
        self.id = id
        self.address = f"n{id:05d}"
        self.site = site
        self.up = self.down = rate
        self.joins = 0.0
        self.dies = INF
        self.alive = True
        self.started = False
        self.have = bytearray(pieces)
        self.count = 0
        self.in_flight: set[int] = set()
        self.waiting_since: dict[int, float] = {}
        self.peers: dict[int, Peer] = {}  # polled (asked) peers
        self.views: dict[int, PeerView] = {}
        #: Who of its site crosses for which piece (None: to rank again, as
        #: peers were polled or dropped).
        self.crossers: Crossers | None = None
        self.pollers: set[int] = set()
        self.up_free = self.down_free = 0.0
        self.served = 0
        self.received: dict[str, int] = {}
        self.sent = 0
        self.talked: set[int] = set()
        self.done = INF
        self.choose_at = INF
        self.wake_at = INF
        self.late = False
        self.stuck = 0
        self.progress = -1
        self.since = 0.0
        self.seed_site: str | None = None
        #: Ids of the peers it knows (late nodes); None: every node not late.
        self.known: set[int] | None = None
        self.serving = 0
        self.next_step = 0.0
        self.tick_count = -1
        self.asked: dict[int, list[tuple[float, str]]] = {}
        self.typical: float | None = None
        #: Pieces the client pushes again to it, one after the other.
        self.repush: list[int] = []


class Simulation:
    """One broadcast of ``setup``: :meth:`run` returns its figures."""

    def __init__(self, setup: Setup):
        s = self.setup = setup
        self.rng = random.Random(s.seed)
        self.choice_rng = random.Random(s.seed + 1)
        self.limits = Limits.for_pieces(s.piece_timeout, s.piece_size, s.in_flight)
        self.pieces = -(-s.size // s.piece_size)
        self.last = s.size - (self.pieces - 1) * s.piece_size
        self.sites = [f"s{k}" for k in range(s.sites)] if s.sites > 1 else [None]
        self.client_site = self.sites[0]
        self.ideal = s.size / s.rate
        self.heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self.seq = 0
        self.now = 0.0
        self.nodes = [
            Node(i, self.sites[i % len(self.sites)], s.rate, self.pieces)
            for i in range(s.nodes)
        ]
        self.by_address = {n.address: n for n in self.nodes}
        self.cross_free: dict[tuple[str | None, str | None], float] = {}
        self.client_up_free = 0.0
        #: Flows under way, in the order they started (a dict: a set of
        #: objects iterates in address order, and the runs would differ).
        self.flows: dict[Flow, None] = {}
        self.flows_at = 0.0
        self.allocating = False
        self.flows_version = 0
        self.link_ids: dict[tuple, int] = {}
        self.client_bytes = 0
        self.client_lost: set[int] = set()
        self.seeding_done = INF
        #: When the client last pushed each piece again (seed.follow).
        self.pushed_at: dict[int, float] = {}
        self.seeding = 0  # pushes of the plan under way
        self.chooses = 0
        self.events = 0
        self.cross_by_crosser = 0
        self.cross_by_others = 0
        self._pick_fates()
        #: Nodes yet to complete, die or fail: the run ends at 0.
        self.remaining = setup.nodes

    # -- set-up -----------------------------------------------------------------

    def _pick_fates(self) -> None:
        s, rng = self.setup, self.rng
        ids = list(range(s.nodes))
        rng.shuffle(ids)
        n_die, n_late = int(s.nodes * s.die), int(s.nodes * s.late)
        slow = s.slow_node_factor > 1 and s.nodes > 2
        dying, ids = ids[:n_die], ids[n_die:]
        late, ids = ids[:n_late], ids[n_late:]
        for i in dying:
            self.nodes[i].dies = rng.uniform(0.1, 0.9) * self.ideal
        for i in late:
            self.nodes[i].late = True
            self.nodes[i].joins = rng.uniform(0.0, 1.0) * self.ideal
        self.slow: Node | None = None
        if slow and ids:
            node = self.slow = self.nodes[ids[0]]
            node.up = node.down = s.rate / s.slow_node_factor

    def piece_bytes(self, index: int) -> int:
        return self.last if index == self.pieces - 1 else self.setup.piece_size

    # -- the event loop -----------------------------------------------------------

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def run(self) -> dict[str, Any]:
        fetchers = [n for n in self.nodes if not n.late]
        for n in self.nodes:
            if n.dies < INF:
                self.at(n.dies, self.die, n)
            if n.late:
                self.at(n.joins, self.join_late, n)
        seed_site = self.client_site if self.client_site is not None else None
        for n in fetchers:
            n.seed_site = seed_site
            self.at(self.setup.latency, self.start, n, fetchers)
        self.seeds = [n for n in fetchers if n.site == self.client_site] or fetchers
        self.plan = [(self.seeds[i % len(self.seeds)], i) for i in range(self.pieces)]
        self.plan.reverse()
        for _ in range(PUSH_SLOTS):
            self.at(2 * self.setup.latency, self.push_next)
        wall = time.perf_counter()
        heap = self.heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)
            if not self.remaining:
                break
        return self.figures(time.perf_counter() - wall)

    def latency(self, a: Node | None, b: Node | None) -> float:
        site_a = a.site if a is not None else self.client_site
        site_b = b.site if b is not None else self.client_site
        s = self.setup
        return s.latency if site_a == site_b else s.cross_latency

    # -- the client (seed.broadcast) ----------------------------------------------

    def push_next(self, answered: bool = False) -> None:
        """A push slot is free (``answered``: its last push was answered)."""
        self.seeding -= answered
        while self.plan:
            node, index = self.plan.pop()
            if node.id not in self.client_lost:
                self.seeding += 1
                self.push(node, index, self.pushed_seed)
                return
        # seed.broadcast: follow() pushes again once seed() is done, i.e.
        # once every push was answered, not when the last one starts.
        if not self.seeding and self.seeding_done == INF:
            self.seeding_done = self.now
            self.at(self.now, self.follow)

    def pushed_seed(self) -> None:
        self.push_next(answered=True)

    def push(self, node: Node, index: int, then: Callable[[], None] | None) -> None:
        """The client sends piece ``index`` to ``node``; ``then`` when it answered."""
        nbytes = self.piece_bytes(index)
        lat = self.latency(None, node)
        if self.setup.links == "fair":
            arrive = (self.at_latency, lat, self.pushed, node, index, nbytes, then)
            self.transfer(None, node, nbytes, self.now + lat, arrive)
            return
        end = self.book(None, node, nbytes, self.now + lat)
        self.at(end, self.pushed, node, index, nbytes, then)

    def pushed(self, node: Node, index: int, nbytes: int, then) -> None:
        lat = self.latency(None, node)
        if not node.alive:
            self.client_lost.add(node.id)
        else:
            self.client_bytes += nbytes
            node.sent += 1
            self.accept(node, index, "client", nbytes)
        if then is not None:
            self.at(self.now + lat, then)

    def follow(self) -> None:
        """Each second: push what no live peer a node knows holds, asked twice."""
        waiting = False
        for node in self.nodes:
            if node.late or node.done < INF or not node.alive:
                continue
            if node.id in self.client_lost:
                continue
            waiting = True
            if node.repush:
                continue  # its follow() awaits those pushes, one by one
            node.sent += 1  # its answer to the client's wait
            missing = self.unavailable(node)
            node.stuck = node.stuck + 1 if missing else 0
            if node.stuck >= 2:
                node.stuck = 0
                node.repush = missing
                self.repush_next(node)
        if waiting:
            self.at(self.now + FOLLOW_EVERY, self.follow)

    def repush_next(self, node: Node) -> None:
        """seed.follow pushes the missing pieces one after the other, awaiting each.

        A piece pushed again less than ``REPUSH_AFTER`` ago is skipped.
        """
        while node.repush and node.alive and node.id not in self.client_lost:
            index = node.repush[0]
            if self.now - self.pushed_at.get(index, -INF) < REPUSH_AFTER:
                node.repush = node.repush[1:]
                continue
            self.pushed_at[index] = self.now
            self.push(node, index, lambda: self.repushed(node))
            return
        node.repush = []

    def repushed(self, node: Node) -> None:
        node.repush = node.repush[1:]
        self.repush_next(node)

    def unavailable(self, node: Node) -> list[int]:
        """``Download.unavailable``: lacked, not asked for, no live peer holds it."""
        own_only = node.seed_site is not None and node.seed_site == node.site
        live = [
            p
            for p in node.peers.values()
            if not p.dropped and (not own_only or self.nodes[p.id].site == node.site)
        ]
        if any(p.complete for p in live):
            return []
        return [
            i
            for i in range(self.pieces)
            if not node.have[i]
            and i not in node.in_flight
            and not any(p.have and p.have[i] for p in live)
        ]

    # -- links --------------------------------------------------------------------

    def book(
        self, src: Node | None, dst: Node, nbytes: int, earliest: float, peek=False
    ) -> float:
        """Queue one piece from ``src`` (None: the client) on each link; its arrival.

        Each link (the sender's uplink, the receiver's downlink, the site
        link if it crosses) carries its pieces one after the other at its
        rate; the piece has arrived once the last of them carried it. With
        ``peek``, nothing is reserved.
        """
        s = self.setup
        nbytes = nbytes * s.wire_overhead  # on the wire
        src_site = self.client_site if src is None else src.site
        up_free = self.client_up_free if src is None else src.up_free
        up = s.rate if src is None else src.up
        up_end = max(earliest, up_free) + nbytes / up
        down_end = max(earliest, dst.down_free) + nbytes / dst.down
        end = max(up_end, down_end)
        key = (src_site, dst.site)
        cross = src_site != dst.site
        if cross:
            cross_end = max(earliest, self.cross_free.get(key, 0.0)) + nbytes / (
                s.rate / s.slow_factor
            )
            end = max(end, cross_end)
        if not peek:
            if src is None:
                self.client_up_free = up_end
            else:
                src.up_free = up_end
            dst.down_free = down_end
            if cross:
                self.cross_free[key] = cross_end
        return end + self.latency(src, dst)

    # -- shared links ("fair") --------------------------------------------------------

    def at_latency(self, lat: float, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` one latency from now: the last byte's way to the receiver."""
        self.at(self.now + lat, fn, *args)

    def link_id(self, key: tuple) -> int:
        return self.link_ids.setdefault(key, len(self.link_ids))

    def transfer(
        self, src: Node | None, dst: Node, nbytes: int, start: float, done: tuple
    ) -> Flow:
        """Send ``nbytes`` from ``src`` (None: the client) to ``dst`` from ``start``.

        ``done`` (fn, *args) is called once its last byte left the links; the
        piece crosses the sender's uplink, the receiver's downlink and the
        link between their sites, if any, sharing each with what else
        crosses it meanwhile.
        """
        s = self.setup
        over = s.wire_overhead
        src_site = self.client_site if src is None else src.site
        up = (s.rate if src is None else src.up) / over
        links = [
            (self.link_id(("up", -1 if src is None else src.id)), up),
            (self.link_id(("down", dst.id)), dst.down / over),
        ]
        if src_site != dst.site:
            cross = s.rate / s.slow_factor / over
            links.append((self.link_id(("cross", src_site, dst.site)), cross))
        flow = Flow(links, nbytes, done)
        self.at(start, self.flow_starts, flow)
        return flow

    def flow_starts(self, flow: Flow) -> None:
        if flow.state != "waiting":
            return
        self.advance_flows()
        flow.state = "active"
        self.flows[flow] = None
        self.reallocate()

    def flows_end(self, version: int) -> None:
        """The next flow to end ends now (and any that end with it)."""
        if version != self.flows_version:
            return  # the rates changed since: another event is due
        self.advance_flows()
        ended = [f for f in self.flows if f.left <= f.rate * 1e-6]
        for f in ended:
            f.state = "finished"
            del self.flows[f]
        self.reallocate()
        for f in ended:
            fn, *args = f.done
            fn(*args)

    def cancel(self, flow: Flow) -> None:
        """Stop sending ``flow`` (its receiver gave up on it)."""
        if flow.state == "active":
            self.advance_flows()
            del self.flows[flow]
            self.reallocate()
        if flow.state in ("waiting", "active"):
            flow.state = "cancelled"

    def advance_flows(self) -> None:
        dt = self.now - self.flows_at
        if dt > 0:
            for f in self.flows:
                f.left -= f.rate * dt
        self.flows_at = self.now

    def reallocate(self) -> None:
        """Share the links anew, once for all the flows that start or end now."""
        if not self.allocating:
            self.allocating = True
            self.at(self.now, self.allocate)

    def allocate(self) -> None:
        """Max-min fair rates (progressive filling); each flow's end, rescheduled."""
        self.allocating = False
        self.advance_flows()
        cap: dict[int, float] = {}
        count: dict[int, int] = {}
        on: dict[int, list[Flow]] = {}
        for f in self.flows:
            for link, c in f.links:
                if link not in cap:
                    cap[link], count[link], on[link] = c, 0, []
                count[link] += 1
                on[link].append(f)
        heap = [(cap[k] / count[k], k) for k in cap]
        heapq.heapify(heap)
        fixed: set[Flow] = set()
        while heap:
            share, k = heapq.heappop(heap)
            if not count[k]:
                continue
            fair = cap[k] / count[k]
            if fair - share > 1e-9 * fair:
                heapq.heappush(heap, (fair, k))  # grew since: not its turn yet
                continue
            for f in on[k]:
                if f in fixed:
                    continue
                fixed.add(f)
                f.rate = fair
                for link, _ in f.links:
                    cap[link] = max(cap[link] - fair, 0.0)  # no rounding below 0
                    count[link] -= 1
                    if link != k and count[link]:
                        heapq.heappush(heap, (cap[link] / count[link], link))
        # One event, for the flow that ends first: no stale events pile up.
        self.flows_version += 1
        if self.flows:
            first = min(max(f.left, 0.0) / f.rate for f in self.flows)
            self.at(self.now + first, self.flows_end, self.flows_version)

    # -- a node's fetch loop (fetch.Fetcher) --------------------------------------

    def start(self, node: Node, known: list[Node]) -> None:
        """The offer arrived: learn ``known``, poll a sample of them."""
        if not node.alive:
            return
        node.started = True
        node.sent += 1  # the registry hears that it holds some (hold)
        self.learn(node, [p for p in known if p is not node])
        self.at(self.now + POLL_MORE_AFTER, self.tick, node)
        self.wake(node)

    def learn(self, node: Node, known: list[Node]) -> None:
        """Know ``known``; poll every one of them, or ``--peers`` of each site."""
        k = self.setup.peers
        if node.known is not None:
            node.known.update(p.id for p in known)
        fresh = [p for p in known if p.id not in node.peers and p is not node]
        polled: dict[str | None, int] = {}
        for q in node.peers.values():
            if not q.dropped:
                site = self.nodes[q.id].site
                polled[site] = polled.get(site, 0) + 1
        self.poll(node, peers_to_poll(fresh, polled, k, self.rng))

    def poll(self, node: Node, chosen: list[Node]) -> None:
        for p in chosen:
            node.peers[p.id] = Peer(p.id)
            self.at(self.now + self.latency(node, p), self.poll_arrives, node, p)
        self.forget_crossers(node)

    def tick(self, node: Node) -> None:
        """``Fetcher._start_polls``: no new piece for a while and none to ask for."""
        if node.done < INF or not node.alive:
            return
        if node.count == node.tick_count and self.unavailable(node):
            self.grow(node)
        node.tick_count = node.count
        self.at(self.now + POLL_MORE_AFTER, self.tick, node)

    def grow(self, node: Node) -> None:
        """No polled peer holds pieces it lacks: poll ``--peers`` more it knows."""
        k = self.setup.peers
        if not k:
            return
        known = node.known
        unpolled = [
            q
            for q in self.nodes
            if q is not node
            and q.id not in node.peers
            and (not q.late if known is None else q.id in known)
        ]
        self.poll(node, peers_to_poll(unpolled, {}, k, self.rng, more=True))

    def forget_crossers(self, node: Node) -> None:
        """``Download.crossers``: ranked again at the next choice."""
        node.crossers = None

    def crossers(self, node: Node) -> Crossers | None:
        """``Download.crossers``: its site's nodes it knows and has not dropped.

        Polled or not, itself included. None without sites.
        """
        if node.site is None:
            return None
        if node.crossers is None:
            known = node.known
            peers = node.peers
            node.crossers = Crossers(
                node.address,
                [
                    q.address
                    for q in self.nodes
                    if q.site == node.site
                    and q is not node
                    and (
                        not peers[q.id].dropped
                        if q.id in peers
                        else (not q.late if known is None else q.id in known)
                    )
                ],
            )
        return node.crossers

    def poll_arrives(self, node: Node, peer: Node) -> None:
        """``node``'s first ``have`` reaches ``peer``: it answers with its bitmap."""
        node.sent += 1
        node.talked.add(peer.id)
        peer.talked.add(node.id)
        back = self.now + self.latency(node, peer)
        if not peer.alive:
            self.at(back, self.drop, node, peer.id)
            return
        peer.sent += 1
        if not peer.started:
            self.at(back + HAVE_WAIT, self.poll_arrives, node, peer)
            return
        bitmap, complete = bytes(peer.have), peer.done < INF
        if not complete:
            peer.pollers.add(node.id)
        self.at(back, self.bitmap_arrives, node, peer.id, bitmap, complete)

    def bitmap_arrives(
        self, node: Node, peer_id: int, bitmap: bytes, complete: bool
    ) -> None:
        p = node.peers.get(peer_id)
        if p is None or p.dropped or node.done < INF:
            return
        p.have = bytearray(bitmap)
        p.complete = complete
        node.views.pop(peer_id, None)
        self.wake(node)

    def news(self, peer: Node, index: int, complete: bool) -> None:
        """``peer``'s answer to each long poll reaches its pollers (and they poll again)."""
        for poller_id in list(peer.pollers):
            node = self.nodes[poller_id]
            p = node.peers.get(peer.id)
            if p is None or p.dropped or node.done < INF or not node.alive:
                peer.pollers.discard(poller_id)
                continue
            peer.sent += 1
            node.sent += 1  # the next long poll
            if p.have is not None:
                p.have[index] = 1
            if complete:
                p.complete = True
                node.views.pop(peer.id, None)
                peer.pollers.discard(poller_id)
            if complete or not (node.have[index] or index in node.in_flight):
                # News of a piece it holds or asked for changes no choice.
                self.wake(node)
        if complete:
            peer.pollers.clear()

    def wake(self, node: Node, when: float | None = None) -> None:
        """Run ``node``'s fetch loop at ``when`` (now), once however often woken."""
        t = max(self.now if when is None else when, node.next_step)
        if node.choose_at <= t or node.done < INF:
            return
        node.choose_at = t
        self.at(t, self.step, node)

    def alarm(self, node: Node, t: float) -> None:
        """Wake ``node`` at ``t`` (a piece timeout, a busy peer's back-off)."""
        if t < node.wake_at and node.done == INF:
            node.wake_at = t
            self.at(t, self.ring, node, t)

    def ring(self, node: Node, t: float) -> None:
        if node.wake_at == t:
            node.wake_at = INF
            self.wake(node)

    def step(self, node: Node) -> None:
        if node.choose_at != self.now:
            return
        node.choose_at = INF
        if not node.alive or node.done < INF:
            return
        node.next_step = self.now + self.setup.loop_gap
        if len(node.in_flight) >= self.limits.total:
            return  # choose would return nothing: saves the call
        views = []
        for pid, p in node.peers.items():
            if p.dropped or (p.have is None and not p.complete):
                continue  # never a candidate
            v = node.views.get(pid)
            if v is None:
                v = node.views[pid] = PeerView(
                    self.nodes[pid].address,
                    site=self.nodes[pid].site,
                    have=p.have,
                    complete=p.complete,
                    in_flight=p.in_flight,
                    busy_until=p.busy_until,
                )
            views.append(v)
        late, late_at = late_pieces(node.asked, self.now, node.typical, self.limits)
        if late_at is not None:
            self.alarm(node, late_at + 1e-6)
        view = NodeView(
            node.address,
            node.have,
            site=node.site,
            seed_site=node.seed_site,
            in_flight=frozenset(node.in_flight),
            waiting_since=node.waiting_since,
            late=late,
            crossers=self.crossers(node),
        )
        self.chooses += 1
        choice = choose(view, views, self.now, self.choice_rng, self.limits)
        node.waiting_since = choice.waiting_since
        for index, address in choice.requests:
            peer = self.by_address[address]
            p = node.peers[peer.id]
            p.in_flight += 1
            node.views.pop(peer.id, None)
            node.in_flight.add(index)
            node.asked.setdefault(index, []).append((self.now, address))
            if peer.site != node.site:
                if crosser(view, views, index) == node.address:
                    self.cross_by_crosser += 1
                else:
                    self.cross_by_others += 1
            self.request(node, peer, index)
        # The next piece timeout of a piece held only elsewhere: one more of
        # its ranking may cross then.
        timeout = self.limits.piece_timeout
        ahead = [
            w + timeout * (1 + (self.now - w) // timeout)
            for w in node.waiting_since.values()
        ]
        if ahead:
            self.alarm(node, min(ahead) + 1e-6)
        if self.setup.serve_slots:
            busy = [
                p.busy_until for p in node.peers.values() if p.busy_until > self.now
            ]
            if busy:
                self.alarm(node, min(busy))

    def request(self, node: Node, peer: Node, index: int) -> None:
        node.sent += 1
        node.talked.add(peer.id)
        peer.talked.add(node.id)
        sent = self.now
        arrives = sent + self.latency(node, peer)
        if not peer.alive or peer.dies <= arrives:
            self.at(arrives + self.latency(node, peer), self.failed, node, peer, index)
            return
        nbytes = self.piece_bytes(index)
        if not (peer.have[index] or peer.done < INF):
            # It does not hold it (yet): it answers "missing".
            peer.sent += 1
            self.at(arrives + self.latency(node, peer), self.missing, node, peer, index)
            return
        if self.setup.links == "fair":
            self.request_fair(node, peer, index, nbytes, sent, arrives)
            return
        # Would it come within the piece timeout? If not, the peer is dropped
        # then, and the links stay free for others.
        end = self.book(peer, node, nbytes, arrives, peek=True)
        if end - sent > self.limits.piece_timeout:
            self.at(sent + self.limits.piece_timeout, self.failed, node, peer, index)
            return
        slots = self.setup.serve_slots
        if slots and peer.serving >= slots:
            peer.sent += 1
            back = arrives + self.latency(node, peer)
            self.at(back, self.busy, node, peer, index)
            return
        end = self.book(peer, node, nbytes, arrives)
        peer.sent += 1
        peer.served += nbytes
        if slots:
            peer.serving += 1
            self.at(end - self.latency(node, peer), self.sent_piece, peer)
        self.at(end, self.piece_arrives, node, peer, index, nbytes)

    def request_fair(
        self, node: Node, peer: Node, index: int, nbytes: int, sent: float, at: float
    ) -> None:
        """The piece crosses shared links; past the piece timeout the node gives up."""
        slots = self.setup.serve_slots
        if slots and peer.serving >= slots:
            peer.sent += 1
            self.at(at + self.latency(node, peer), self.busy, node, peer, index)
            return
        peer.sent += 1
        if slots:
            peer.serving += 1
        lat = self.latency(node, peer)
        flow = self.transfer(
            peer, node, nbytes, at, (self.served, node, peer, index, nbytes, lat)
        )
        self.at(
            sent + self.limits.piece_timeout, self.piece_late, node, peer, index, flow
        )

    def served(
        self, node: Node, peer: Node, index: int, nbytes: int, lat: float
    ) -> None:
        peer.served += nbytes
        if self.setup.serve_slots:
            peer.serving -= 1
        self.at(self.now + lat, self.piece_arrives, node, peer, index, nbytes)

    def piece_late(self, node: Node, peer: Node, index: int, flow: Flow) -> None:
        """``asyncio.wait_for(..., piece_timeout)`` ran out: drop the peer."""
        if flow.state in ("waiting", "active"):
            self.cancel(flow)
            if self.setup.serve_slots:
                peer.serving -= 1
            self.failed(node, peer, index)

    def ended(self, node: Node, peer: Node, index: int, came: bool = False) -> Peer:
        """``Download.answered``: the request is over; ``came``: the piece, first."""
        p = node.peers[peer.id]
        p.in_flight -= 1
        node.views.pop(peer.id, None)
        none_left, node.typical = end_request(
            node.asked, index, peer.address, self.now, node.typical, came=came
        )
        if none_left:
            node.in_flight.discard(index)
        return p

    def piece_arrives(self, node: Node, peer: Node, index: int, nbytes: int) -> None:
        if not node.alive:
            return
        self.ended(node, peer, index, came=not node.have[index])
        if peer.dies < self.now - self.latency(node, peer):
            self.drop(node, peer.id)
            return
        self.accept(node, index, peer.address, nbytes)
        self.wake(node)

    def sent_piece(self, peer: Node) -> None:
        peer.serving -= 1

    def busy(self, node: Node, peer: Node, index: int) -> None:
        p = self.ended(node, peer, index)
        p.busy_until = self.limits.busy_until(self.now, node.typical)
        self.alarm(node, p.busy_until)

    def missing(self, node: Node, peer: Node, index: int) -> None:
        p = self.ended(node, peer, index)
        if p.have is not None:
            p.have[index] = 0
        p.complete = False
        self.wake(node)

    def failed(self, node: Node, peer: Node, index: int) -> None:
        self.ended(node, peer, index)
        self.drop(node, peer.id)

    def drop(self, node: Node, peer_id: int) -> None:
        p = node.peers.get(peer_id)
        if p is None or p.dropped:
            return
        p.dropped = True
        node.views.pop(peer_id, None)
        self.forget_crossers(node)
        self.nodes[peer_id].pollers.discard(node.id)
        if self.setup.peers and node.alive and node.done == INF:
            # The bounded set: poll another peer instead.
            known = [
                q
                for q in self.known_by(node)
                if q.id not in node.peers and q.alive and q.started
            ]
            if known:
                self.learn(node, known)
        self.wake(node)

    def known_by(self, node: Node) -> list[Node]:
        if node.late:
            return [q for q in self.nodes if q.started and q.id != node.id]
        return [q for q in self.nodes if not q.late and q.id != node.id]

    def accept(self, node: Node, index: int, source: str, nbytes: int) -> None:
        if node.have[index] or not node.alive:
            return
        node.have[index] = 1
        node.count += 1
        node.received[source] = node.received.get(source, 0) + nbytes
        complete = node.count == self.pieces
        if complete:
            node.done = self.now
            self.remaining -= 1
            node.sent += 1  # hold: complete
            for pid in node.peers:
                self.nodes[pid].pollers.discard(node.id)
        if node.pollers:
            lat = self.setup.latency
            self.at(self.now + lat, self.news, node, index, complete)
        if not complete:
            self.wake(node)

    def die(self, node: Node) -> None:
        if node.done == INF and node.alive:
            self.remaining -= 1
        node.alive = False
        for poller_id in list(node.pollers):
            poller = self.nodes[poller_id]
            self.at(self.now + self.latency(node, poller), self.drop, poller, node.id)
        node.pollers.clear()

    # -- late nodes (nanny.fetch: the registry's holders) -----------------------------

    def join_late(self, node: Node) -> None:
        if not node.alive:
            return
        node.sent += 1  # where
        node.known = set()
        holders = [q for q in self.nodes if q.started and q.alive and q is not node]
        if not holders:
            self.fail(node)  # "no node that holds it"
            return
        node.started = True
        node.seed_site = None
        self.learn(node, holders)
        node.since = self.now
        self.at(self.now + FOLLOW_EVERY, self.late_check, node)
        self.wake(node)

    def late_check(self, node: Node) -> None:
        """``Fetcher.fetch``'s loop: more peers when stuck, give up after a stall."""
        if node.done < INF or not node.alive:
            return
        if node.count != node.progress:
            node.progress, node.since = node.count, self.now
        elif self.unavailable(node):
            node.sent += 1  # where again
            holders = [
                q
                for q in self.nodes
                if q.started and q.alive and q is not node and q.id not in node.peers
            ]
            self.learn(node, holders)
            if self.now - node.since > self.setup.stall_timeout:
                self.fail(node)
                return
        self.at(self.now + FOLLOW_EVERY, self.late_check, node)

    def fail(self, node: Node) -> None:
        """A late node gives up: alive, and not complete."""
        node.alive = False
        self.remaining -= 1

    # -- figures -----------------------------------------------------------------

    def figures(self, wall: float) -> dict[str, Any]:
        s = self.setup
        took = [n for n in self.nodes if n.started or n.late]
        alive = [n for n in took if n.dies == INF]
        done = [n for n in alive if n.done < INF]
        # The slow node's own link bounds its own time: its figure apart.
        seconds = max((n.done for n in done if n is not self.slow), default=INF)
        slow = self.slow
        ingress: dict[str | None, int] = {site: 0 for site in self.sites}
        for n in self.nodes:
            for source, nbytes in n.received.items():
                src_site = (
                    self.client_site
                    if source == "client"
                    else self.by_address[source].site
                )
                if src_site != n.site:
                    ingress[n.site] += nbytes
        served = [n.served for n in took]
        average = sum(served) / len(served) if served else 0
        finish = sorted(n.done for n in done)
        return {
            "nodes": s.nodes,
            "sites": s.sites,
            "seconds": seconds,
            "seconds_p50": finish[len(finish) // 2] if finish else INF,
            "slow_node_seconds": slow.done if slow is not None else None,
            "slow_node_floor": s.size / slow.down if slow is not None else None,
            "client_bytes_ratio": self.client_bytes / s.size,
            "max_site_ingress_ratio": max(ingress.values()) / s.size,
            "max_serve_ratio": max(served) / average if average else 0.0,
            "complete": len(done) / len(alive) if alive else 0.0,
            "messages_per_node_max": max(n.sent for n in self.nodes),
            "messages_per_node_mean": sum(n.sent for n in self.nodes) / s.nodes,
            "peers_per_node_max": max(len(n.talked) for n in self.nodes),
            "cross_fetches": {
                "by_crosser": self.cross_by_crosser,
                "by_others": self.cross_by_others,
            },
            "died": sum(1 for n in self.nodes if n.dies < INF),
            "late": sum(1 for n in self.nodes if n.late),
            "events": self.events,
            "choose_calls": self.chooses,
            "wall_seconds": wall,
            "setup": asdict(s),
        }


def simulate(setup: Setup) -> dict[str, Any]:
    """The figures of one simulated broadcast.

    Examples
    --------
    >>> fig = simulate(Setup(nodes=4, size=32 * 2**20, piece_size=2**20))
    >>> fig["complete"], fig["client_bytes_ratio"]
    (1.0, 1.0)
    """
    return Simulation(setup).run()


def at_scale(setup: Setup) -> dict[str, Any]:
    """``simulate(setup)`` with ``seconds_at_2``: the same setup at 2 nodes.

    Examples
    --------
    >>> fig = at_scale(Setup(nodes=8, size=32 * 2**20, piece_size=2**20))
    >>> fig["nodes"], fig["seconds"] >= fig["seconds_at_2"] > 0
    (8, True)
    """
    fig = simulate(setup)
    two = simulate(replace(setup, nodes=2, die=0.0, late=0.0))
    fig["seconds_at_2"] = two["seconds"]
    return fig


# -- printing ------------------------------------------------------------------------

HEADER = (
    f"{'nodes':>6} {'sites':>5} {'peers':>5} {'seconds':>8} {'at 2':>7} {'ratio':>6} "
    f"{'client':>6} {'ingress':>7} {'serve':>6} {'complete':>8} {'msgs':>7} "
    f"{'talked':>6} {'wall s':>7}"
)


def row(fig: dict[str, Any]) -> str:
    peers = fig["setup"]["peers"] or "all"
    return (
        f"{fig['nodes']:>6} {fig['sites']:>5} {peers:>5} {fig['seconds']:>8.2f} "
        f"{fig['seconds_at_2']:>7.2f} {fig['seconds'] / fig['seconds_at_2']:>6.3f} "
        f"{fig['client_bytes_ratio']:>6.3f} {fig['max_site_ingress_ratio']:>7.3f} "
        f"{fig['max_serve_ratio']:>6.2f} {fig['complete']:>8.4f} "
        f"{fig['messages_per_node_max']:>7} {fig['peers_per_node_max']:>6} "
        f"{fig['wall_seconds']:>7.1f}"
    )


def targets(fig: dict[str, Any]) -> list[str]:
    n, sites = fig["nodes"], fig["sites"]
    label = f"{n} nodes, {sites} site{'s' if sites > 1 else ''}"
    lines = [
        target_line(
            f"{label}: time over time at 2",
            fig["seconds"] / fig["seconds_at_2"],
            "<=",
            1.5,
        ),
        target_line(
            f"{label}: client bytes / artifact", fig["client_bytes_ratio"], "<=", 1.1
        ),
        target_line(f"{label}: most served / average", fig["max_serve_ratio"], "<=", 3),
        target_line(f"{label}: surviving nodes complete", fig["complete"], ">=", 1),
    ]
    if sites > 1:
        lines.insert(
            2,
            target_line(
                f"{label}: most bytes into a site / artifact",
                fig["max_site_ingress_ratio"],
                "<=",
                1.2,
            ),
        )
    return lines


def report(figs: list[dict[str, Any]]) -> None:
    print(HEADER)
    for fig in figs:
        print(row(fig))
    print()
    for fig in figs:
        for line in targets(fig):
            print(line)


# -- validation against the real series ---------------------------------------------


def validate(path: Path, base: Setup) -> list[dict[str, Any]]:
    """Simulated against measured seconds at each node count of ``path``."""
    real = json.loads(path.read_text())
    link = real.get("link", {})
    setup = replace(
        base,
        sites=1,
        die=0.0,
        late=0.0,
        slow_node_factor=0.0,
        rate=float(link.get("rate", base.rate)),
        latency=float(link.get("latency", base.latency)),
        size=int(link.get("size", base.size)),
        piece_size=int(link.get("piece_size", base.piece_size)),
        peers=int(link.get("peers", PEERS_POLLED)),
        piece_timeout=float(link.get("piece_timeout", base.piece_timeout)),
        wire_overhead=float(link.get("wire_overhead", base.wire_overhead)),
        links=str(link.get("links", base.links)),
    )
    rows = []
    print(
        f"validation against {path}: {dask.utils.format_bytes(setup.size)} in "
        f"{dask.utils.format_bytes(setup.piece_size)} pieces, "
        f"{setup.rate / 1e6:.4g} MB/s links ({setup.links}, wire overhead "
        f"{setup.wire_overhead:.3f}), latency {setup.latency * 1e3:.2f} ms"
    )
    print(f"{'nodes':>6} {'real s':>8} {'sim s':>8} {'error':>7}")
    for n, measured in zip(real["nodes"], real["seconds"], strict=True):
        simulated = simulate(replace(setup, nodes=int(n)))["seconds"]
        error = (simulated - measured) / measured
        rows.append(
            {"nodes": n, "real": measured, "simulated": simulated, "error": error}
        )
        print(f"{n:>6} {measured:>8.2f} {simulated:>8.2f} {error:>+7.1%}")
    worst = max(abs(r["error"]) for r in rows)
    print(target_line("simulated vs real seconds: worst |error|", worst, "<=", 0.15))
    return rows


# -- the command line ---------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000])
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--slow-factor", type=float, default=10.0)
    parser.add_argument("--die", type=float, default=0.0, help="fraction of nodes")
    parser.add_argument("--late", type=float, default=0.0, help="fraction of nodes")
    parser.add_argument("--size", type=parse_bytes, default="256MiB")
    parser.add_argument(
        "--piece-size",
        type=parse_bytes,
        default=None,
        help="default: envship.transfer.piece-size",
    )
    parser.add_argument(
        "--peers",
        type=int,
        default=PEERS_POLLED,
        help=f"peers each node polls, per site (default {PEERS_POLLED}); 0: all",
    )
    parser.add_argument(
        "--rate", type=parse_bytes, default="100MB", help="per node, /s"
    )
    parser.add_argument("--latency", type=float, default=0.0002, help="one way, s")
    parser.add_argument("--cross-latency", type=float, default=0.002)
    parser.add_argument("--slow-node-factor", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--serve-slots",
        type=int,
        default=int(config.get("transfer.serve-slots")),
        help="pieces a node sends at once, else busy (default: the real config's; "
        "0: no limit)",
    )
    parser.add_argument(
        "--in-flight",
        type=parse_bytes,
        default=config.get("transfer.in-flight"),
        help="bytes of pieces a node asks for at once (default: the real config's)",
    )
    parser.add_argument(
        "--links",
        choices=["fifo", "fair"],
        default="fifo",
        help="fifo: a link carries one piece at a time; fair: all at once, shared",
    )
    parser.add_argument(
        "--wire-overhead",
        type=float,
        default=1.0,
        help="bytes on the wire per byte of a piece (headers)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--small", action="store_true", help="2, 8 and 64 nodes: seconds, for CI"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="200, 1,000 and 5,000 nodes, one site and two, 1%% die, 10%% late",
    )
    parser.add_argument(
        "--validate", type=Path, help="compare with a real series (see above)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    piece = args.piece_size or default_piece_size()
    base = Setup(
        nodes=2,
        sites=args.sites,
        slow_factor=args.slow_factor,
        die=args.die,
        late=args.late,
        size=int(args.size),
        piece_size=int(piece),
        peers=args.peers,
        rate=float(args.rate),
        latency=args.latency,
        cross_latency=args.cross_latency,
        slow_node_factor=args.slow_node_factor,
        seed=args.seed,
        serve_slots=args.serve_slots,
        in_flight=int(args.in_flight),
        links=args.links,
        wire_overhead=args.wire_overhead,
        piece_timeout=dask.utils.parse_timedelta(config.get("transfer.piece-timeout")),
        stall_timeout=dask.utils.parse_timedelta(config.get("transfer.stall-timeout")),
    )
    if args.validate:
        rows = validate(args.validate, base)
        if args.json:
            args.json.write_text(json.dumps({"validation": rows}, indent=1))
        return 0
    if args.small:
        setups = [
            replace(base, nodes=n, size=64 * 2**20, die=0.02, late=0.1, sites=k)
            for k in (1, 2)
            for n in (2, 8, 64)
        ]
    elif args.full:
        setups = [
            replace(base, nodes=n, sites=k, die=0.01, late=0.1)
            for k in (1, 2)
            for n in (200, 1000, 5000)
        ]
    else:
        setups = [replace(base, nodes=n) for n in args.nodes]
    figs = []
    for setup in setups:
        fig = at_scale(setup)
        figs.append(fig)
        print(row(fig) if len(figs) > 1 else HEADER + "\n" + row(fig), flush=True)
    print()
    for fig in figs:
        for line in targets(fig):
            print(line)
    if args.json:
        out: Any = figs[0] if len(figs) == 1 else {"runs": figs}
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
