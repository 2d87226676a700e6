"""bench/simulate.py in a few seconds: its invariants on small runs, its validation."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import simulate  # noqa: E402
from simulate import Setup  # noqa: E402

SMALL = Setup(nodes=8, size=16 * 2**20, piece_size=2**20, slow_node_factor=0)


def test_every_node_completes_and_the_client_sends_each_piece_once():
    fig = simulate.simulate(SMALL)
    assert fig["complete"] == 1.0
    assert fig["client_bytes_ratio"] == 1.0
    assert fig["choose_calls"] > 0
    # No node gets the artifact faster than its link carries it.
    assert fig["seconds"] >= SMALL.size / SMALL.rate


def test_the_same_seed_gives_the_same_figures():
    a, b = simulate.simulate(SMALL), simulate.simulate(SMALL)
    for fig in (a, b):
        fig.pop("wall_seconds")
    assert a == b


def test_two_sites_cross_the_slow_link_about_once():
    fig = simulate.simulate(replace(SMALL, sites=2, slow_factor=4))
    assert fig["complete"] == 1.0
    assert 1.0 <= fig["max_site_ingress_ratio"] <= 1.2
    assert fig["cross_fetches"]["by_crosser"] > 0


def test_nodes_that_die_or_join_late_are_counted_apart():
    fig = simulate.simulate(replace(SMALL, nodes=20, die=0.1, late=0.2))
    assert fig["died"] == 2 and fig["late"] == 4
    assert fig["complete"] == 1.0


def test_bounded_peers_bound_whom_a_node_talks_to():
    fig = simulate.simulate(replace(SMALL, nodes=30, peers=4))
    assert fig["complete"] == 1.0
    # Its 4 polled peers, and those that poll it (any of 29).
    assert fig["peers_per_node_max"] < 29


def test_validation_prints_both_series_and_the_error(tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text(
        json.dumps(
            {
                "nodes": [2, 4],
                "seconds": [0.2, 0.25],
                "link": {"rate": 1e8, "size": 16 * 2**20, "piece_size": 2**20},
            }
        )
    )
    rows = simulate.validate(real, SMALL)
    assert [r["nodes"] for r in rows] == [2, 4]
    assert all(r["simulated"] > 0 for r in rows)
    assert rows[0]["error"] == (rows[0]["simulated"] - 0.2) / 0.2
    out = capsys.readouterr().out
    assert "real s" in out and "sim s" in out and "worst |error|" in out


def _drain(sim: simulate.Simulation) -> None:
    while sim.heap:
        t, _, fn, args = simulate.heapq.heappop(sim.heap)
        sim.now = t
        fn(*args)


def test_fair_links_share_their_rate_among_the_pieces_on_them():
    setup = replace(SMALL, nodes=2, links="fair", wire_overhead=1.0)
    sim = simulate.Simulation(setup)
    ends: dict[str, float] = {}
    a, b = sim.nodes
    # Two pieces out of the client's link at once: each at half its rate.
    sim.transfer(None, a, 10**6, 0.0, (lambda: ends.setdefault("a", sim.now),))
    sim.transfer(None, b, 10**6, 0.0, (lambda: ends.setdefault("b", sim.now),))
    _drain(sim)
    assert abs(ends["a"] - 2e6 / setup.rate) < 1e-9
    assert abs(ends["b"] - 2e6 / setup.rate) < 1e-9
    # One piece alone: at the full rate, less the headers on the wire.
    sim = simulate.Simulation(replace(setup, wire_overhead=1.25))
    sim.transfer(None, sim.nodes[0], 10**6, 1.0, (lambda: ends.update(c=sim.now),))
    _drain(sim)
    assert abs(ends["c"] - (1.0 + 1.25e6 / setup.rate)) < 1e-9


def test_fair_links_complete_and_the_client_sends_each_piece_once():
    fig = simulate.simulate(replace(SMALL, links="fair"))
    assert fig["complete"] == 1.0
    assert fig["client_bytes_ratio"] == 1.0
    assert fig["seconds"] >= SMALL.size / SMALL.rate


def test_the_client_follows_once_every_push_was_answered():
    # Slow links, pieces of seconds: had the client asked what is missing
    # while its last pushes were under way, it would send them twice.
    slow = replace(SMALL, nodes=2, rate=250e3, piece_size=2**18, peers=0)
    for links in ("fifo", "fair"):
        fig = simulate.simulate(replace(slow, links=links))
        assert fig["client_bytes_ratio"] == 1.0, links
