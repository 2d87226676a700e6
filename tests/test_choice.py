"""Piece choice (``envship.transfer.choice``) on plain data, no cluster: rarest
first, the budgets, dropped and busy peers, sites and their crossers, and
which peers a node polls."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from envship.transfer.choice import (
    Crossers,
    Limits,
    NodeView,
    PeerView,
    Request,
    choose,
    crosser,
    late_pieces,
    peers_to_poll,
)
from envship.transfer.download import Download
from envship.transfer.pieces import Offer, Peer, PieceTable

LIMITS = Limits(piece_timeout=30.0)


def limits_with(**budgets) -> Limits:
    return Limits(piece_timeout=30.0, **budgets)


def node(count=8, **kw) -> NodeView:
    return NodeView(kw.pop("address", "me"), kw.pop("have", bytes(count)), **kw)


def bitmap(*held: int, count=8) -> bytes:
    return bytes(int(i in held) for i in range(count))


def requests(n, peers, now=0.0, seed=0, limits=None) -> tuple[Request, ...]:
    return choose(n, peers, now, random.Random(seed), limits or LIMITS).requests


def test_rarest_pieces_first():
    peers = [
        PeerView("a", have=bitmap(0, 1, 2, 3)),
        PeerView("b", have=bitmap(0, 1, 2)),
        PeerView("c", have=bitmap(0, 1)),
        PeerView("d", have=bitmap(0)),
    ]
    wide = limits_with(total=100, per_peer=100)
    for seed in range(20):
        chosen = requests(node(), peers, seed=seed, limits=wide)
        assert [r.piece for r in chosen] == [3, 2, 1, 0]
        assert chosen[0] == Request(3, "a")  # its only holder


def test_pieces_nobody_holds_are_not_asked_for():
    peers = [PeerView("a", have=bitmap(1))]
    assert requests(node(), peers) == (Request(1, "a"),)
    assert requests(node(), [PeerView("a")]) == ()  # said nothing yet


def test_the_budget_per_peer():
    limits = limits_with(total=100, per_peer=2)
    one = [PeerView("a", complete=True)]
    assert len(requests(node(), one, limits=limits)) == 2
    busy = [PeerView("a", complete=True, in_flight=1)]
    assert len(requests(node(), busy, limits=limits)) == 1
    full = [PeerView("a", complete=True, in_flight=2)]
    assert requests(node(), full, limits=limits) == ()
    # Spread: each request goes to the peer with the fewest in flight.
    three = [PeerView(a, complete=True) for a in "abc"]
    assert Counter(r.peer for r in requests(node(), three, limits=limits)) == {
        "a": 2,
        "b": 2,
        "c": 2,
    }
    loaded = [PeerView("a", complete=True, in_flight=1), PeerView("b", complete=True)]
    chosen = requests(node(), loaded, limits=limits_with(total=2, per_peer=2))
    assert chosen[0].peer == "b" and len(chosen) == 2


def test_the_total_budget():
    peers = [PeerView(a, complete=True) for a in "abcdefgh"]
    assert len(requests(node(count=50), peers, limits=limits_with(total=6))) == 6
    asked = node(count=50, in_flight=frozenset({0, 1, 2, 3}))
    assert len(requests(asked, peers, limits=limits_with(total=6))) == 2
    full = node(count=50, in_flight=frozenset(range(6)))
    assert requests(full, peers, limits=limits_with(total=6)) == ()


def test_dropped_and_busy_peers_are_skipped():
    peers = [
        PeerView("dropped", complete=True, dropped=True),
        PeerView("busy", complete=True, busy_until=10.0),
    ]
    assert requests(node(), peers, now=5.0) == ()
    # Once its back-off is over a busy peer is asked again; a dropped never.
    assert {r.peer for r in requests(node(), peers, now=10.0)} == {"busy"}


def test_nothing_is_chosen_twice_nor_what_is_held_or_asked_for():
    rng = random.Random(7)
    for seed in range(200):
        count = rng.randrange(1, 40)
        have = bytes(rng.random() < 0.3 for _ in range(count))
        in_flight = frozenset(i for i in range(count) if rng.random() < 0.1)
        peers = [
            PeerView(
                f"p{k}",
                site=rng.choice(["east", "west", None]),
                have=bytes(rng.random() < 0.5 for _ in range(count)),
                complete=rng.random() < 0.1,
                in_flight=rng.randrange(3),
                busy_until=rng.choice([0.0, 2.0]),
                dropped=rng.random() < 0.1,
            )
            for k in range(rng.randrange(0, 8))
        ]
        me = NodeView("me", have, site=rng.choice(["east", None]), in_flight=in_flight)
        limits = limits_with(total=rng.randrange(1, 10), per_peer=rng.randrange(1, 4))
        chosen = requests(me, peers, now=1.0, seed=seed, limits=limits)
        pieces = [r.piece for r in chosen]
        assert len(set(pieces)) == len(pieces)
        assert not any(have[i] or i in in_flight for i in pieces)
        assert len(chosen) <= max(0, limits.total - len(in_flight))
        by_address = {p.address: p for p in peers}
        for address, n in Counter(r.peer for r in chosen).items():
            p = by_address[address]
            assert not p.dropped and p.busy_until <= 1.0
            assert p.in_flight + n <= limits.per_peer
        assert all(by_address[r.peer].holds(r.piece) for r in chosen)


def test_deterministic_and_its_inputs_unchanged():
    peers = [PeerView(a, site="west", complete=True) for a in "abc"]
    me = node(site="east", waiting_since={5: 1.0})
    first = choose(me, peers, 2.0, random.Random(3), LIMITS)
    assert first == choose(me, peers, 2.0, random.Random(3), LIMITS)
    assert me.waiting_since == {5: 1.0}
    assert first.waiting_since is not me.waiting_since


def test_same_site_peers_first():
    peers = [
        PeerView("far", site="west", complete=True),
        PeerView("near", site="east", have=bitmap(0, 1, 2, 3)),
    ]
    me = node(site="east", waiting_since={0: 0.0})
    choice = choose(
        me, peers, 1.0, random.Random(0), limits_with(total=100, per_peer=100)
    )
    near = {r.piece for r in choice.requests if r.peer == "near"}
    assert near == {0, 1, 2, 3}
    assert 0 not in choice.waiting_since  # held at our site now
    # A node without a site asks anyone.
    chosen = requests(node(), peers, limits=limits_with(total=100, per_peer=100))
    assert {r.peer for r in chosen} == {"far", "near"}


def test_one_stable_crosser_per_piece_per_site():
    count = 12
    far = PeerView("far", site="west", complete=True)
    east = ["e0", "e1", "e2"]
    wide = limits_with(total=100, per_peer=100)

    def view(me: str, **kw) -> NodeView:
        return NodeView(me, bytes(count), site="east", **kw)

    def peers_of(me: str, **changes) -> list[PeerView]:
        others = [
            PeerView(a, site="east", **changes.get(a, {})) for a in east if a != me
        ]
        return [far, *others]

    asked: Counter[int] = Counter()
    for me in east:
        for r in requests(view(me), peers_of(me), limits=wide):
            assert r.peer == "far"
            assert crosser(view(me), peers_of(me), r.piece) == me
            asked[r.piece] += 1
    assert asked == {i: 1 for i in range(count)}  # each piece crosses once

    # Stable: a node of the site that completes stays in the choice.
    done = {"e2": {"complete": True}}
    assert [crosser(view("e0"), peers_of("e0", **done), i) for i in range(count)] == [
        crosser(view("e0"), peers_of("e0"), i) for i in range(count)
    ]
    # A node that is dropped leaves it: its pieces go to the others.
    gone = {"e2": {"dropped": True}}
    crossers = {crosser(view("e0"), peers_of("e0", **gone), i) for i in range(count)}
    assert crossers == {"e0", "e1"}

    # The others wait for the crosser; a piece timeout later (it may have
    # died unseen) the second of the piece's ranking crosses too, after two
    # the third: here all three.
    first = choose(view("e0"), peers_of("e0"), 100.0, random.Random(0), wide)
    mine = {i for i in range(count) if crosser(view("e0"), peers_of("e0"), i) == "e0"}
    assert {r.piece for r in first.requests} == mine
    assert set(first.waiting_since) == set(range(count))
    waited = view("e0", waiting_since=first.waiting_since)
    ranks = Crossers("e0", east)
    second = {i for i in range(count) if ranks.among_first(i, 2)}
    assert mine < second < set(range(count))
    later = choose(waited, peers_of("e0"), 130.5, random.Random(0), wide)
    assert {r.piece for r in later.requests} == second
    last = choose(waited, peers_of("e0"), 160.5, random.Random(0), wide)
    assert {r.piece for r in last.requests} == set(range(count))


def test_a_crosser_that_died_unseen_costs_one_more_crossing_not_the_whole_site():
    """Nodes that do not poll a dead crosser keep it in their ranking: after a
    piece timeout only the next one of the piece's ranking crosses for it."""
    count, timeout = 64, 30.0
    site = [f"e{i}" for i in range(50)]
    far = PeerView("far", site="west", complete=True)
    wide = limits_with(total=1000, per_peer=1000)
    dead = Crossers(site[0], site).first(7)
    crossing = []
    for me in site:
        if me == dead:
            continue
        # It knows every node of its site alive, the dead one too.
        node = NodeView(
            me,
            bytes(count),
            site="east",
            waiting_since={i: 0.0 for i in range(count)},
            crossers=Crossers(me, site),
        )
        before = choose(node, [far], timeout - 1, random.Random(0), wide)
        after = choose(node, [far], timeout + 1, random.Random(0), wide)
        assert 7 not in {r.piece for r in before.requests}
        if 7 in {r.piece for r in after.requests}:
            crossing.append(me)
    assert len(crossing) == 1  # the second of piece 7's ranking, alone


def test_the_seeded_site_never_crosses_before_a_piece_timeout():
    count = 6
    far = PeerView("far", site="west", complete=True)
    wide = limits_with(total=100, per_peer=100)
    me = NodeView("e0", bytes(count), site="east", seed_site="east")
    # It would be the crosser of every piece (its site's only node) ...
    assert {crosser(me, [far], i) for i in range(count)} == {"e0"}
    # ... but the client sends its site every piece.
    first = choose(me, [far], 0.0, random.Random(0), wide)
    assert first.requests == ()
    again = NodeView(
        "e0",
        bytes(count),
        site="east",
        seed_site="east",
        waiting_since=first.waiting_since,
    )
    assert choose(again, [far], 29.0, random.Random(0), wide).requests == ()
    late = choose(again, [far], 30.5, random.Random(0), wide)
    assert {r.piece for r in late.requests} == set(range(count))
    # A node of another site than the seeded one crosses as usual.
    west = NodeView("w0", bytes(count), site="north", seed_site="east")
    assert len(choose(west, [far], 0.0, random.Random(0), wide).requests) == count


# -- which peers a node polls -------------------------------------------------------


def test_a_node_polls_a_few_of_each_site_and_more_only_when_asked():
    rng = random.Random(0)
    east = [PeerView(f"e{i}", site="east") for i in range(30)]
    west = [PeerView(f"w{i}", site="west") for i in range(30)]
    chosen = peers_to_poll(east + west, {}, 4, rng)
    assert Counter(p.site for p in chosen) == {"east": 4, "west": 4}
    # Topped up to 4 a site: east polls 3 live ones already.
    chosen = peers_to_poll(east + west, {"east": 3, "west": 4}, 4, rng)
    assert [p.site for p in chosen] == ["east"]
    more = peers_to_poll(east + west, {"east": 4, "west": 4}, 4, rng, more=True)
    assert Counter(p.site for p in more) == {"east": 4, "west": 4}
    assert peers_to_poll(east[:2], {}, 4, rng) == east[:2]  # fewer than k: all
    assert peers_to_poll(east, {"east": 9}, 0, rng) == east  # 0: every one


def test_a_download_polls_k_peers_and_replaces_a_dropped_one():
    table = PieceTable.of_bytes(bytes(4 << 16), piece_size=1 << 16)
    offer = Offer("a" * 32, "env", None, table)  # type: ignore[arg-type]
    download = Download(offer, None, None)  # type: ignore[arg-type]
    download.add_peers([Peer(f"tcp://n{i}:1") for i in range(10)], "tcp://me:1")
    rng = random.Random(0)
    assert len(download.poll_more(3, rng)) == 3
    assert download.poll_more(3, rng) == []  # three polled: none more
    polled = [p for p in download.peers.values() if p.polled]
    polled[0].dropped = "gone"
    assert len(download.poll_more(3, rng)) == 1  # the dropped one replaced
    assert len(download.poll_more(3, rng, more=True)) == 3
    assert sum(p.polled for p in download.peers.values()) == 7


# -- late requests ----------------------------------------------------------------


def test_a_late_piece_is_asked_of_another_peer_of_its_site_once():
    slow = PeerView("slow", site="east", have=bitmap(0, count=1))
    fast = PeerView("fast", site="east", have=bitmap(0, count=1))
    west = PeerView("west", site="west", have=bitmap(0, count=1))
    asked = {0: [(0.0, "slow")]}
    waiting = node(count=1, site="east", in_flight=frozenset({0}))
    # Not late yet: nothing more is asked.
    late, upcoming = late_pieces(asked, 0.1, 0.1, LIMITS)
    assert late == {} and upcoming == pytest.approx(0.4)
    assert requests(waiting, [slow, fast, west]) == ()
    # Late: asked of the other peer of its site, never again of the slow one
    # nor across sites.
    late, _ = late_pieces(asked, 1.0, 0.1, LIMITS)
    assert late == {0: frozenset({"slow"})}
    view = node(count=1, site="east", in_flight=frozenset({0}), late=late)
    assert requests(view, [slow, fast, west]) == (Request(0, "fast"),)
    assert requests(view, [slow, west]) == ()
    # Asked twice: never a third time; before any piece came, nothing is late.
    assert late_pieces({0: [(0.0, "slow"), (1.0, "fast")]}, 9.0, 0.1, LIMITS)[0] == {}
    assert late_pieces(asked, 9.0, None, LIMITS) == ({}, None)


def test_a_download_counts_each_request_and_learns_how_long_a_piece_takes():
    table = PieceTable.of_bytes(bytes(4 << 16), piece_size=1 << 16)
    offer = Offer("a" * 32, "env", None, table)  # type: ignore[arg-type]
    download = Download(offer, None, None)  # type: ignore[arg-type]
    download.asking(0, "slow", 0.0)
    download.asking(0, "fast", 1.0)  # late: asked again
    download.answered(0, "fast", 1.2, came=True)
    assert download.typical == pytest.approx(0.2)
    assert 0 in download.in_flight  # the slow request is still out
    download.answered(0, "slow", 5.0, came=False)  # came second: not counted
    assert download.typical == pytest.approx(0.2)
    assert 0 not in download.in_flight and not download.asked
    download.asking(1, "fast", 2.0)
    download.answered(1, "fast", 2.4, came=True)
    assert download.typical == pytest.approx(0.8 * 0.2 + 0.2 * 0.4)
