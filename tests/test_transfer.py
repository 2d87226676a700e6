"""Peer-to-peer broadcast on real clusters on 127.0.0.1 (one cache folder per
node, nannies started with ``--preload-nanny envship``): every piece verified
on arrival, the client sending each byte about once, dead and lying peers,
sites, TLS, and nodes that join later."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import cloudpickle
import dask.config
import pytest
import xxhash
from distributed.comm import connect
from distributed.core import ConnectionPool, Server

import envship
from envship.archive import path_digest
from envship.errors import CorruptArchiveError
from envship.manifest import ThinManifest
from envship.node.cache import EnvCache
from envship.policy import NotAllowedError
from envship.table import MAX_FILES
from envship.transfer import (
    BlobServer,
    FailureKind,
    Offer,
    Peer,
    PieceTable,
    broadcast,
)
from envship.transfer.messages import PieceAnswer, PieceRequest
from envship.transfer.pieces import MIN_PIECE_SIZE
from envship.transfer.server import MAX_TABLES
from fixtures.cluster import local_cluster, wait_until, wait_until_async

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def base(env_prefix, tmp_path_factory):
    return envship.pack(env_prefix("base"), store=tmp_path_factory.mktemp("store"))


def offer_of(artifact, piece_size="1 MiB") -> Offer:
    with dask.config.set({"envship.transfer.piece-size": piece_size}):
        return Offer.of_artifact(artifact)


def nannies(client) -> dict[str, str]:
    """Worker name -> its nanny's address."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {w["name"]: w["nanny"] for w in workers}


def ship(client, artifact, offer, fetchers, holders=()):
    return client.sync(
        broadcast, client.rpc, artifact.path, offer, list(fetchers), list(holders)
    )


def file_hash(path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prefix() -> str:
    return sys.prefix


def prefixes(client) -> dict[str, str]:
    names = {
        a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
    }
    return {names[a]: p for a, p in client.run(prefix).items()}


# -- the piece table, alone -----------------------------------------------------


def test_piece_table_round_trip_and_refusals():
    data = os.urandom(300_000)
    table = PieceTable.of_bytes(data, 65536)
    assert table.count == 5 and table.span(4) == (262144, 300_000 - 262144)
    assert PieceTable.from_msg(table.to_msg()) == table
    assert table.verify(0, data[:65536]) and not table.verify(0, data[1:65537])
    assert not table.verify(4, data[262144:] + b"x")

    def lie(**changes):
        return {**table.to_msg(), **changes}

    for msg, problem in [
        (lie(digest="0" * 32), "does not match"),
        (lie(digests=table.to_msg()["digests"][:-1]), "pieces"),
        (lie(piece_size=1), "piece size"),
        (lie(piece_size=True), "piece size"),
        (lie(size=-1), "size"),
        (lie(size=1 << 50), "size"),
        (lie(digests=["zz" * 16] * 5), "hex"),
        (lie(digests=[d + "\n" for d in table.digests]), "hex"),
        ("not a dict", "dict"),
    ]:
        with pytest.raises(ValueError, match=problem):
            PieceTable.from_msg(msg)


def test_a_broadcast_says_what_kind_of_failure_each_node_met(base):
    """Lost, refused or failed, told apart by kind, with nannies played by fakes."""
    offer = offer_of(base)

    class FakeNanny:
        def __init__(self, address: str):
            self.address = address

        async def envship_offer(self, **msg):
            if self.address == "refuses":
                raise envship.EnvshipError(base.name, "no room", "free disk space")
            return {"complete": False, "have": 0}

        async def envship_put(self, **msg):
            if self.address == "dies":
                raise OSError("connection closed")
            return True

        async def envship_wait(self, **msg):
            await asyncio.sleep(0.01)
            if self.address == "fails":
                return {"complete": False, "have": 0, "error": "its disk is full"}
            if self.address == "dies":
                return {"complete": False, "have": 0, "unavailable": []}
            return {"complete": True, "have": offer.table.count, "received": {}}

    names = ["ok", "refuses", "dies", "fails"]
    report = asyncio.run(
        broadcast(
            FakeNanny, base.path, offer, [Peer(n) for n in names], peer_to_peer=False
        )
    )
    assert set(report.nodes) == {"ok"}
    assert {n: f.kind for n, f in report.failed.items()} == {
        "refuses": FailureKind.REFUSED,
        "dies": FailureKind.LOST,
        "fails": FailureKind.ERROR,
    }
    assert str(report.failed["refuses"]) == "could not start the transfer: no room"
    assert str(report.failed["dies"]).startswith("lost during the transfer")
    assert report.failed["fails"].why == "its disk is full"


# -- broadcast on real clusters -------------------------------------------------


@pytest.mark.parametrize("polled", [24, 2])
def test_six_nodes_get_it_while_the_client_sends_it_about_once(tmp_path, base, polled):
    # 24: every peer polled; 2: two of the five at first, more when stuck.
    nodes = {f"n{i}": 1 for i in range(6)}
    polls = {"DASK_ENVSHIP__TRANSFER__PEERS_POLLED": str(polled)}
    with local_cluster(tmp_path / "c", nodes, node_env=polls) as (client, caches):
        offer = offer_of(base)
        fetchers = [Peer(nanny) for nanny in nannies(client).values()]
        report = ship(client, base, offer, fetchers)

        assert not report.failed and len(report.nodes) == 6
        # With two peers polled, a node may find no source of a piece for a
        # second or two (more on a loaded machine), and the client then
        # pushes it again, to one node at a time: 1.16x with one peer polled
        # on a machine at load 22. The bound at scale is bench/simulate.py's.
        most = 1.1 if polled >= 5 else 1.5
        assert base.size <= report.client_bytes <= most * base.size
        for state in report.nodes.values():
            # Every piece arrived once, verified, from the client or a peer.
            assert state["have"] == state["count"] == offer.table.count
            assert sum(state["received"].values()) == base.size
            assert not state["rejected"] and not state["dropped"]
            if polled >= 5:
                assert state["polled"] == 5
            else:  # two at first, more when no polled peer held what it lacked
                assert 2 <= state["polled"] <= 5
        from_peers = sum(
            n
            for state in report.nodes.values()
            for source, n in state["received"].items()
            if source != "client"
        )
        assert from_peers >= 4 * base.size  # the nodes passed pieces on
        for cache in caches.values():
            held = EnvCache(cache)
            assert file_hash(held.archive_path(base.id)) == file_hash(base.path)
            assert held.manifest(base.id) == base.manifest
            assert not list((cache / "tmp").iterdir())


def test_a_serving_nanny_killed_mid_transfer(tmp_path, base):
    # Slow links (4 MB/s out of each nanny) so that the transfer is long.
    slow = {"DASK_ENVSHIP__TRANSFER__MAX_RATE": "4 MB"}
    nodes = {f"n{i}": 1 for i in range(4)}
    with local_cluster(tmp_path / "c", nodes, node_env=slow) as cluster:
        client, caches = cluster
        offer = offer_of(base, "256 KiB")
        by_name = nannies(client)
        victim = by_name["n0-0"]
        fetchers = [Peer(by_name[f"n{i}-0"]) for i in range(4)]

        async def kill_while_it_serves():
            transfer = asyncio.ensure_future(
                broadcast(client.rpc, base.path, offer, fetchers)
            )
            others = [by_name[f"n{i}-0"] for i in range(1, 4)]
            while True:
                await asyncio.sleep(0.1)
                states = [await client.rpc(o).envship_status() for o in others]
                sources = {
                    s for st in states for t in st["transfers"] for s in t["sources"]
                }
                if victim in sources:
                    break
            cluster.kill_node("n0")
            return await transfer

        report = client.sync(kill_while_it_serves)
        assert set(report.failed) == {victim}
        assert report.failed[victim].kind is FailureKind.LOST
        assert "lost" in report.failed[victim].why
        for i in range(1, 4):
            archive = EnvCache(caches[f"n{i}"]).archive_path(base.id)
            assert file_hash(archive) == file_hash(base.path)

        # Its partial download stays, and a new nanny there resumes it.
        assert list((caches["n0"] / "tmp").glob(f"{base.id}.*.partial"))
        cluster.add_node("n0", 1)
        client.wait_for_workers(4, timeout=60)
        newcomer = nannies(client)["n0-1"]
        again = ship(client, base, offer, [Peer(newcomer)], [Peer(by_name["n1-0"])])
        state = again.nodes[newcomer]
        assert 0 < state["received"]["disk"] < base.size
        assert sum(state["received"].values()) == base.size
        assert again.client_bytes == 0  # a node that holds it seeded instead
        archive = EnvCache(caches["n0"]).archive_path(base.id)
        assert file_hash(archive) == file_hash(base.path)


def test_a_peer_serving_corrupt_pieces_is_dropped(tmp_path, base):
    with local_cluster(tmp_path / "c", {"a": 1, "b": 1, "c": 1}) as (client, caches):
        by_name = nannies(client)
        offer = offer_of(base)
        with dask.config.set({"envship.transfer.piece-size": "1 MiB"}):
            assert client.use_environment(base, workers=["a-0", "b-0"]).ok
        # Node a reads its table once (as when it serves), then its disk
        # rots: one byte of every piece changes.
        table = offer.table
        client.sync(
            client.rpc(by_name["a-0"]).envship_have,
            id=base.id,
            digest=table.digest,
            piece_size=table.piece_size,
        )
        archive = EnvCache(caches["a"]).archive_path(base.id)
        with open(archive, "r+b") as f:
            for i in range(table.count):
                offset, _ = table.span(i)
                f.seek(offset + 7)
                byte = f.read(1)
                f.seek(offset + 7)
                f.write(bytes([byte[0] ^ 0xFF]))

        with dask.config.set({"envship.transfer.piece-size": "1 MiB"}):
            report = client.use_environment(base, workers=["c-0"])
        assert report.ok
        state = report.transfer.nodes[by_name["c-0"]]
        assert set(state["rejected"]) == {by_name["a-0"]}
        assert "bad piece" in state["dropped"][by_name["a-0"]]
        assert by_name["a-0"] not in state["received"]
        assert state["received"][by_name["b-0"]] == base.size
        assert prefixes(client)["c-0"] == str(caches["c"] / base.id)


def test_nodes_joining_later_fetch_from_whoever_holds_it_now(tmp_path, base):
    with local_cluster(tmp_path / "c", {"first": 1}) as cluster:
        client, caches = cluster
        assert client.use_environment(base).ok

        # No client call from here on: each newcomer asks the registry.
        cluster.add_node("second", 1)
        client.wait_for_workers(2, timeout=60)
        assert prefixes(client)["second-0"] == str(caches["second"] / base.id)

        cluster.kill_node("first")  # the node the client sent it to
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1)
        cluster.add_node("third", 1)
        client.wait_for_workers(2, timeout=60)
        assert prefixes(client) == {
            "second-0": str(caches["second"] / base.id),
            "third-0": str(caches["third"] / base.id),
        }
        assert EnvCache(caches["third"]).has_archive(base.id)

        status = envship.status(client)
        assert {w["name"]: w["id"] for w in status.workers} == {
            "second-0": base.id,
            "third-0": base.id,
        }
        assert all(w["environment"] == base.name for w in status.workers)
        (blob,) = status.blobs
        assert blob["id"] == base.id and blob["complete"] >= 2
        assert {n["nannies"] for n in status.nodes} == {1}

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "envship.cli",
                "status",
                "--scheduler",
                client.scheduler.address,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "third-0" in out and base.name in out and "2 whole" in out


def test_the_whole_flow_over_tls(tmp_path, base):
    with local_cluster(tmp_path / "c", {"a": 1, "b": 1}, tls=True) as cluster:
        client, caches = cluster
        assert client.scheduler.address.startswith("tls://")
        report = client.use_environment(base)
        assert report.ok and report.transfer.client_bytes <= 1.1 * base.size
        assert len(report.transfer.nodes) == 2
        cluster.add_node("c", 1)
        client.wait_for_workers(3, timeout=60)
        assert prefixes(client) == {
            name: str(caches[name[0]] / base.id) for name in ("a-0", "b-0", "c-0")
        }


def test_two_sites_each_get_it_across_the_slow_link_about_once(tmp_path, base):
    with local_cluster(tmp_path / "c", {}) as cluster:
        client, _ = cluster
        for site in ("east", "west"):
            for i in range(2):
                cluster.add_node(f"{site}{i}", 1, env={"DASK_ENVSHIP__SITE": site})
        client.wait_for_workers(4, timeout=60)
        sites = {nanny: name[:4] for name, nanny in nannies(client).items()}
        offer = offer_of(base)
        fetchers = [Peer(nanny, site) for nanny, site in sites.items()]
        # The client sits in east: it seeds east, and west gets it from east.
        report = client.sync(
            broadcast, client.rpc, base.path, offer, fetchers, client_site="east"
        )
        assert not report.failed and report.client_bytes == base.size

        def into(site):
            return sum(
                n
                for nanny, state in report.nodes.items()
                if sites[nanny] == site
                for source, n in state["received"].items()
                if (sites.get(source) or "east") != site  # the client is in east
            )

        assert base.size <= into("west") <= 1.2 * base.size
        assert into("east") == 0  # nothing comes back across the slow link
        assert report.crossing(sites, "east") == into("west") + into("east")


def test_blob_handlers_refuse_lies(tmp_path, base):
    with local_cluster(tmp_path / "c", {"solo": 1}) as (client, caches):
        rpc = client.rpc(nannies(client)["solo-0"])
        offer = offer_of(base)
        good = offer.to_msg()
        table = offer.table

        def call(op, **msg):
            return client.sync(getattr(rpc, f"envship_{op}"), **msg)

        lies = [
            {**good, "id": base.id + "\n"},
            {**good, "id": "../../etc"},
            {**good, "manifest": {**base.manifest.to_dict(), "id": "0" * 32}},
            {**good, "table": {**good["table"], "digest": "0" * 32}},
            {**good, "table": {**good["table"], "size": 1 << 45}},
            {**good, "table": {**good["table"], "piece_size": 10}},
        ]
        for lie in lies:
            with pytest.raises(ValueError):
                call("offer", offer=lie, peers=[])
        with pytest.raises(ValueError):
            call("offer", offer=good, peers=[{"address": 5}])
        thin = {
            "id": "b" * 32,
            "thin_of": "c" * 32,  # not the id of the manifest it carries
            "base": base.id,
            "env": base.manifest.to_dict(),
            "packed_size": 1,
            "files": 1,
            "refs": 1,
        }
        with pytest.raises(ValueError, match="'env'"):
            call("offer", offer={**good, "id": "b" * 32, "manifest": thin}, peers=[])

        # The delta path: which files the store lacks, installs from a thin pack.
        for keys in ("text", b"x" * 27, bytes(26 * (MAX_FILES + 1))):
            with pytest.raises(ValueError):
                call("lacks", keys=keys)
        assert call("lacks", keys=bytes(26)) == b"\x01"
        for via in ("../x", base.id + "\n", 5):
            with pytest.raises(ValueError):
                call("install", artifact_id=base.id, via=via)

        assert call("offer", offer=good, peers=[]) == {"complete": False, "have": 0}
        key = {"id": base.id, "digest": table.digest}
        for index in (-1, table.count, True, "0", 2**62):
            with pytest.raises(ValueError):
                call("put", **key, index=index, data=b"x")
        # Bytes that are not the piece are refused and never written.
        assert call("put", **key, index=0, data=b"\0" * table.span(0)[1]) is False
        assert call("put", **key, index=0, data=b"\0" * (1 << 20 + 1)) is False
        state = call("wait", **key, timeout=0)
        assert state["have"] == 0 and state["rejected"] == {"client": 2}
        for timeout in (-1, 1e9, "1"):
            with pytest.raises(ValueError):
                call("wait", **key, timeout=timeout)
        for lie in [
            {"piece_size": 0, "index": 0},
            {"piece_size": table.piece_size, "index": -1},
            {"piece_size": table.piece_size, "index": table.count},
        ]:
            with pytest.raises(ValueError):
                call("piece", **key, **lie)
        with pytest.raises(ValueError):
            call(
                "piece",
                id=base.id,
                digest="Z" * 32,
                piece_size=table.piece_size,
                index=0,
            )
        # It holds no piece yet: it says so rather than sending zeros.
        assert call("piece", **key, piece_size=table.piece_size, index=0) == {
            "missing": True
        }
        with pytest.raises(ValueError):
            call("have", **key, piece_size=table.piece_size, known=-5)

        # The real pieces still go in, and the nanny lives on.
        with open(base.path, "rb") as f:
            for i in range(table.count):
                offset, length = table.span(i)
                f.seek(offset)
                assert call("put", **key, index=i, data=f.read(length)) is True
        wait_until(lambda: EnvCache(caches["solo"]).has_archive(base.id))
        assert client.submit(sum, [1, 2]).result() == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_a_node_that_cannot_hold_it_is_named_and_nobody_restarts(tmp_path, base):
    folder = tmp_path / "c"
    tiny = folder / "tiny-cache"
    tiny.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", tiny], check=True
    )
    try:
        with local_cluster(folder, {"roomy": 1}) as cluster:
            client, caches = cluster
            cluster.add_node("tiny", 1)
            client.wait_for_workers(2, timeout=60)
            before = set(client.scheduler_info(n_workers=-1)["workers"])
            with pytest.raises(envship.EnvshipError) as info:
                client.use_environment(base)
            message = str(info.value)
            assert nannies(client)["tiny-0"] in message and "does not fit" in message
            assert "roomy" not in message and nannies(client)["roomy-0"] not in message
            # Nobody restarted; nothing half-written stays on the small disk.
            assert set(client.scheduler_info(n_workers=-1)["workers"]) == before
            assert set(prefixes(client).values()) == {sys.prefix}
            assert not list((tiny / "tmp").iterdir())
    finally:
        subprocess.run(["umount", tiny], check=True)


def test_an_offer_after_a_failed_download_starts_afresh(tmp_path, base):
    offer = offer_of(base)

    async def scenario():
        async with ConnectionPool() as rpc:
            server = BlobServer(EnvCache(tmp_path / "cache"), rpc, "tcp://127.0.0.1:1")
            call = server.handlers()  # as the nanny installs them
            await call["envship_offer"](offer=offer.to_msg(), peers=[])
            first = server.downloads[(base.id, offer.table.digest)]
            server.cancel(first, "gave up")
            state = await call["envship_wait"](
                id=base.id, digest=offer.table.digest, timeout=10
            )
            assert state["error"] == "gave up" and not state["complete"]

            await call["envship_offer"](offer=offer.to_msg(), peers=[])
            second = server.downloads[(base.id, offer.table.digest)]
            assert second is not first and second.error is None
            with open(base.path, "rb") as f:
                for i in range(offer.table.count):
                    offset, length = offer.table.span(i)
                    f.seek(offset)
                    await call["envship_put"](
                        id=base.id,
                        digest=offer.table.digest,
                        index=i,
                        data=f.read(length),
                    )
            state = await call["envship_wait"](
                id=base.id, digest=offer.table.digest, timeout=10
            )
            assert state["complete"] and state["error"] is None

    asyncio.run(scenario())
    assert file_hash(EnvCache(tmp_path / "cache").archive_path(base.id)) == file_hash(
        base.path
    )


def test_a_node_serves_while_it_hands_the_archive_to_its_cache(tmp_path, base):
    offer = offer_of(base)
    table = offer.table
    cache = EnvCache(tmp_path / "cache")

    async def scenario():
        async with blob_server(cache) as (server, call):
            await call["envship_offer"](offer=offer.to_msg(), peers=[])
            # Another process installing this id holds its lock: the hand-over
            # of the finished download (adopt_archive) waits for it.
            lock = cache._lock(base.id)
            lock.acquire()
            try:
                with open(base.path, "rb") as f:
                    for i in range(table.count):
                        offset, length = table.span(i)
                        f.seek(offset)
                        await call["envship_put"](
                            id=base.id,
                            digest=table.digest,
                            index=i,
                            data=f.read(length),
                        )
                await asyncio.sleep(0.5)
                assert not cache.has_archive(base.id)  # still handing over
                have = await call["envship_have"](
                    id=base.id, digest=table.digest, piece_size=table.piece_size
                )
                assert have["complete"]
                reply = await call["envship_piece"](
                    id=base.id,
                    digest=table.digest,
                    piece_size=table.piece_size,
                    index=0,
                )
                assert table.verify(0, PieceAnswer.from_msg(reply).data)
            finally:
                lock.release()
            state = await call["envship_wait"](
                id=base.id, digest=table.digest, timeout=10
            )
            assert state["complete"] and cache.has_archive(base.id)
            reply = await call["envship_piece"](
                id=base.id, digest=table.digest, piece_size=table.piece_size, index=1
            )
            assert table.verify(1, PieceAnswer.from_msg(reply).data)

    asyncio.run(scenario())


def test_the_seeded_site_gets_lost_pieces_from_the_client_not_across(tmp_path, base):
    # Slow links; a piece timeout so long that waiting for it would hang.
    env = {
        "DASK_ENVSHIP__TRANSFER__MAX_RATE": "4 MB",
        "DASK_ENVSHIP__TRANSFER__PIECE_TIMEOUT": "10 minutes",
    }
    with local_cluster(tmp_path / "c", {}, node_env=env) as cluster:
        client, caches = cluster
        for node, site in [("east0", "east"), ("east1", "east"), ("west0", "west")]:
            cluster.add_node(node, 1, env={"DASK_ENVSHIP__SITE": site})
        client.wait_for_workers(3, timeout=60)
        by_name = nannies(client)
        sites = {nanny: name[:4] for name, nanny in by_name.items()}
        offer = offer_of(base, "256 KiB")
        fetchers = [Peer(nanny, site) for nanny, site in sites.items()]
        victim = by_name["east0-0"]

        async def kill_a_seed():
            transfer = asyncio.ensure_future(
                broadcast(client.rpc, base.path, offer, fetchers, client_site="east")
            )
            while True:  # until the far site has some of the victim's pieces
                await asyncio.sleep(0.1)
                state = await client.rpc(by_name["west0-0"]).envship_status()
                if any(victim in t["sources"] for t in state["transfers"]):
                    break
            cluster.kill_node("east0")
            return await transfer

        report = client.sync(kill_a_seed)
        assert set(report.failed) == {victim}
        east1 = report.nodes[by_name["east1-0"]]["received"]
        # What only east0 and west0 held came from the client, not across.
        assert by_name["west0-0"] not in east1
        assert sum(east1.values()) == base.size
        for node in ("east1", "west0"):
            archive = EnvCache(caches[node]).archive_path(base.id)
            assert file_hash(archive) == file_hash(base.path)


def test_registry_handlers_refuse_lies(tmp_path, base):
    from envship.scheduler.registry import Registry

    with local_cluster(tmp_path / "c", {"solo": 1}) as (client, _):
        client.register_plugin(Registry(), name=Registry.name)
        good = offer_of(base).to_msg()

        def call(op, **msg):
            return client.sync(getattr(client.scheduler, f"envship_{op}"), **msg)

        lies = [
            ("publish", {"offer": {**good, "id": base.id + "\n"}}),
            ("publish", {"offer": {**good, "table": {**good["table"], "size": -1}}}),
            ("publish", {"offer": "not a dict"}),
            ("desire", {"id": "0" * 32}),  # never published
            ("desire", {"id": None, "names": "worker-0"}),  # not a list
            ("hold", {"nanny": 5, "id": base.id, "complete": True}),
            ("hold", {"nanny": "x" * 5000, "id": base.id, "complete": True}),
            (
                "hold",
                {"nanny": "tcp://a:1", "id": base.id, "complete": True, "site": 7},
            ),
            ("runs", {"nanny": "tcp://a:1", "id": 5}),
            ("where", {"id": ["not", "an", "id"]}),
            (
                "claim",
                {"owner": "o", "client": "c", "nannies": "tcp://a:1", "name": "x"},
            ),
            ("claim", {"owner": "o", "client": "c", "nannies": [7], "name": "x"}),
            ("claim", {"owner": "", "client": "c", "nannies": [], "name": "x"}),
            ("release", {"owner": None}),
        ]
        for op, msg in lies:
            with pytest.raises(ValueError):
                call(op, **msg)
        # Nothing of it was kept; an unknown id is not recorded either.
        assert call("hold", nanny="tcp://a:1", id=base.id, complete=True) == "unknown"
        snapshot = call("registry")
        assert snapshot["offers"] == {} and snapshot["holders"] == {}
        assert snapshot["default"] is None and snapshot["by_name"] == {}
        assert call("claim", owner="o", client=client.id, nannies=[], name="x") == {
            "conflicts": {}
        }
        nothing = call("where", name="solo-0")
        assert nothing["offer"] is None and not nothing["holders"]

        # The truth still goes in.
        assert call("publish", offer=good) == "OK"
        assert call("desire", id=base.id, names=["solo-0"]) == "OK"
        assert call("where", name="solo-0")["offer"]["id"] == base.id


@contextlib.asynccontextmanager
async def blob_server(cache: EnvCache):
    """A nanny's transfer side on ``cache``, its handlers served on 127.0.0.1.

    Yields the :class:`BlobServer` (its address in ``served_at``) and its
    handlers by name, each called over a comm as peers call them.
    """
    async with ConnectionPool() as rpc:
        blobs = BlobServer(cache, rpc, "tcp://127.0.0.1:1")
        handlers = blobs.handlers()
        async with Server(handlers) as server:
            await server.listen("tcp://127.0.0.1:0")
            remote = rpc(server.address)
            blobs.served_at = server.address  # type: ignore[attr-defined]
            yield blobs, {name: getattr(remote, name) for name in handlers}


def test_a_peer_asking_for_every_piece_size_gets_a_bounded_table_cache(tmp_path, base):
    # The review: every new piece size hashed the whole archive and kept its
    # table, without bound.
    cache = EnvCache(tmp_path / "cache")
    cache.add_archive(base.id, base.path, base.manifest)
    digest = offer_of(base).table.digest

    async def scenario():
        async with blob_server(cache) as (server, call):
            sizes = [MIN_PIECE_SIZE + 4096 * i for i in range(3 * MAX_TABLES)]
            for size in sizes:
                # At the same time, three peers: hashed once, no error.
                await asyncio.gather(
                    *(
                        call["envship_have"](id=base.id, digest=digest, piece_size=size)
                        for _ in range(3)
                    )
                )
            assert len(server._tables) <= MAX_TABLES
            assert not server._hashing
            # The size the offer uses is still served (hashed again if evicted).
            have = await call["envship_have"](
                id=base.id, digest=digest, piece_size=offer_of(base).table.piece_size
            )
            assert have["complete"]

    asyncio.run(scenario())


def test_a_nanny_sending_all_its_serve_slots_answers_busy_until_a_send_ends(
    tmp_path, base
):
    """The serve slot covers the send, not only the read: while a peer has not
    taken its piece, the next asker hears "busy" and asks another holder."""
    cache = EnvCache(tmp_path / "cache")
    cache.add_archive(base.id, base.path, base.manifest)
    table = offer_of(base, "32 MiB").table  # more than the socket buffers hold
    ask = PieceRequest(base.id, table.digest, table.piece_size, 0).to_msg()

    async def scenario():
        async with blob_server(cache) as (server, call):
            slow = await connect(server.served_at)
            try:
                # A peer asks, and does not read the answer yet.
                await slow.write({"op": "envship_piece", **ask})
                await wait_until_async(lambda: server._serving == 1)
                busy = PieceAnswer.from_msg(await call["envship_piece"](**ask))
                assert busy.busy
                piece = PieceAnswer.from_msg(await slow.read())
                assert table.verify(0, piece.data)
            finally:
                await slow.close()
            # Its send done, the slot serves the next asker.
            again = PieceAnswer.from_msg(await call["envship_piece"](**ask))
            assert table.verify(0, again.data)
            assert server._serving == 0

    with dask.config.set({"envship.transfer.serve-slots": 1}):
        asyncio.run(scenario())


def test_an_offer_nobody_follows_up_ends_and_frees_the_fetch_lock(tmp_path, base):
    # The review: an abandoned offer held locks/<2 hex>.fetch.lock for good,
    # so every later download of an id of that bucket hung.
    offer = offer_of(base)
    cache = EnvCache(tmp_path / "cache")

    async def scenario():
        async with blob_server(cache) as (server, call):
            with dask.config.set({"envship.transfer.idle-timeout": "1s"}):
                await call["envship_offer"](offer=offer.to_msg(), peers=[])
                state = await call["envship_wait"](
                    id=base.id, digest=offer.table.digest, timeout=20
                )
            assert not state["complete"]
            assert "no piece arrived for 1 s" in state["error"]
            lock = cache.fetch_lock(base.id)
            lock.acquire(timeout=0)  # free again
            lock.release()
            # Its partial file stays for a later offer, until the node's gc.
            partial = cache.partial_path(base.id, offer.table.digest)
            assert partial.exists()
            cache.gc()
            assert not partial.exists()

    asyncio.run(scenario())


def test_an_offer_of_an_environment_the_policy_refuses_is_refused(tmp_path, base):
    offer = offer_of(base)
    cache = EnvCache(tmp_path / "cache")

    async def scenario():
        async with blob_server(cache) as (server, call):
            with dask.config.set({"envship.allowed": ["vetted"]}):
                with pytest.raises(NotAllowedError):
                    await call["envship_offer"](offer=offer.to_msg(), peers=[])
            assert not server.downloads

    asyncio.run(scenario())


def put_all(call, offer: Offer, path):
    """Every piece of ``offer``'s table, read from ``path``, as a peer puts them."""

    async def put():
        table = offer.table
        with open(path, "rb") as f:
            for i in range(table.count):
                offset, length = table.span(i)
                f.seek(offset)
                await call["envship_put"](
                    id=offer.id, digest=table.digest, index=i, data=f.read(length)
                )

    return put()


def test_another_environments_bytes_offered_under_an_id_are_never_held_as_it(
    tmp_path, base, env_prefix
):
    # The review: a node kept whatever matched the sender's piece table under
    # the id offered, so any client could complete another environment's
    # bytes as the victim's first; the victim's switch then failed.
    other = envship.pack(env_prefix("venv"), store=tmp_path / "store")
    genuine = offer_of(base)
    forged = Offer(base.id, base.name, base.manifest, offer_of(other).table)
    cache = EnvCache(tmp_path / "cache")

    async def scenario():
        async with blob_server(cache) as (server, call):
            await call["envship_offer"](offer=forged.to_msg(), peers=[])
            await put_all(call, forged, other.path)
            state = await call["envship_wait"](
                id=base.id, digest=forged.table.digest, timeout=20
            )
            assert not state["complete"]
            assert f"offered as {base.id} is not it" in state["error"]
            assert not cache.has_archive(base.id)
            assert not cache.partial_path(base.id, forged.table.digest).exists()

            # The genuine offer of the id still comes through.
            await call["envship_offer"](offer=genuine.to_msg(), peers=[])
            await put_all(call, genuine, base.path)
            state = await call["envship_wait"](
                id=base.id, digest=genuine.table.digest, timeout=20
            )
            assert state["complete"] and state["error"] is None

    asyncio.run(scenario())
    assert file_hash(cache.archive_path(base.id)) == file_hash(base.path)


def test_a_thin_pack_is_held_only_under_the_digest_of_its_bytes(tmp_path, base):
    cache = EnvCache(tmp_path / "cache")
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(4096))
    wrong = xxhash.xxh3_128_hexdigest(b"another thin pack")

    def thin(id: str) -> ThinManifest:
        return ThinManifest(id, base.id, None, base.manifest, 4096, 0, 0)

    with pytest.raises(CorruptArchiveError, match=f"thin pack offered as {wrong}"):
        cache.adopt_archive(wrong, blob, thin(wrong))
    assert not blob.exists() and not cache.has_archive(wrong)
    blob.write_bytes(os.urandom(4096))
    right = path_digest(blob)
    cache.adopt_archive(right, blob, thin(right))
    assert cache.has_archive(right)
