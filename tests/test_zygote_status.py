"""Zygotes in ``envship status``: its text from a hand-made status, and a real
cluster (``dask worker --nanny --preload-nanny envship`` on 127.0.0.1) whose
node lists the zygote its worker forked from."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

import envship
from envship.client.status import ClusterStatus
from fixtures.cluster import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:base lacks numpy:UserWarning"),
]

DEV, BASE = "5f0c2d9a" + "0" * 24, "74ba32d6" + "1" * 24


def hand_made(zygotes: list[dict]) -> ClusterStatus:
    worker = {
        "name": "node-a-0",
        "address": "tcp://127.0.0.1:4001",
        "nanny": "tcp://127.0.0.1:4000",
        "node": "gpu1.example.org:2049:7",
        "site": None,
        "environment": "sklearn-dev",
        "id": DEV,
        "since": 1.7e9,
        "unreachable": None,
    }
    node = {
        "node": "gpu1.example.org:2049:7",
        "site": None,
        "nannies": 1,
        "cache": "/scratch/envship",
        "cache_size": 3 << 30,
        "zygotes": zygotes,
    }
    return ClusterStatus([worker], [node], [])


def test_status_text_lists_each_zygote_after_the_nodes():
    status = hand_made(
        [
            {"id": BASE, "name": "base", "pid": 4343, "rss": 40 << 20},
            {"id": DEV, "name": "sklearn-dev", "pid": 4242, "rss": 52 << 20},
        ]
    )
    workers, nodes, zygotes = status.render(80).split("\n\n")
    assert nodes.splitlines()[0].split()[0] == "host"
    assert [line.split() for line in zygotes.splitlines()] == [
        ["host", "zygote", "of", "pid", "memory"],
        ["gpu1", "base", "74ba32d6", "4343", "40.00", "MiB"],
        ["gpu1", "sklearn-dev", "5f0c2d9a", "4242", "52.00", "MiB"],
    ]
    assert all(len(line) <= 80 for line in zygotes.splitlines())
    assert f"sklearn-dev {DEV}" in status.render(wide=True)


def test_status_text_has_no_zygote_table_when_none_runs():
    assert status_tables(hand_made([])) == 2
    # A status from before zygotes (no key) reads the same.
    old = hand_made([])
    del old.nodes[0]["zygotes"]
    assert status_tables(old) == 2


def status_tables(status: ClusterStatus) -> int:
    text = status.render(80)
    assert "zygote" not in text
    return len(text.split("\n\n"))


def parent_pid() -> int:
    import os

    return os.getppid()


@pytest.fixture(scope="module")
def base(env_prefix, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return envship.pack(env_prefix("base"), name="base", store=store)


def test_status_lists_the_zygote_the_worker_forked_from(tmp_path, base):
    with local_cluster(tmp_path, {"node": 1}) as (client, _):
        assert client.use_environment(base).ok
        [worker_parent] = client.run(parent_pid).values()
        status = envship.status(client)
    [node] = status.nodes
    [zygote] = node["zygotes"]
    assert zygote["pid"] == worker_parent
    assert (zygote["id"], zygote["name"]) == (base.id, "base")
    assert zygote["rss"] > 0
    [table] = [t for t in status.render(80).split("\n\n") if "zygote of" in t]
    _, row = table.splitlines()
    assert row.split()[1:4] == ["base", base.id[:8], str(worker_parent)]
