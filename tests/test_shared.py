"""A shared cluster: several users and environments at once, tasks that say
which environment they need, and the administrators' allowed list. Real
scheduler, real nannies (two nodes of two), two real clients."""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
import pytest
from distributed import Client
from distributed.protocol.pickle import dumps

import envship
from envship.errors import EnvshipError
from envship.node.nanny import UseEnvironment
from envship.policy import NotAllowedError
from envship.transfer import Offer
from fixtures.cluster import local_cluster, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

GROUPS = {"sklearn-dev": ["node-a-0", "node-b-0"], "base": ["node-a-1", "node-b-1"]}


def where_it_ran():
    """A task reporting its input and the environment it ran in.

    A lambda: the scheduler unpickles task graphs, and a function of this
    module would be pickled by reference to a module it cannot import.
    """
    return lambda i: (i, sys.prefix)


def names_by_address(client) -> dict[str, str]:
    return {
        a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
    }


def prefixes(client) -> dict[str, str]:
    names = names_by_address(client)
    return {names[a]: p for a, p in client.run(lambda: sys.prefix).items()}


@pytest.fixture(scope="module")
def envs(env_prefix, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return {name: envship.pack(env_prefix(name), store=store) for name in GROUPS}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, envs):
    """Two clients, each with its environment on its own half of the workers."""
    folder = tmp_path_factory.mktemp("shared")
    with local_cluster(folder, {"node-a": 2, "node-b": 2}) as cluster:
        other = Client(cluster.address, timeout=60)
        try:
            users = dict(zip(GROUPS, [cluster.client, other], strict=True))
            for name, client in users.items():
                assert client.use_environment(envs[name], workers=GROUPS[name]).ok
            yield users, cluster.caches, cluster
        finally:
            other.close()


def expected_prefix(caches, worker: str, artifact) -> str:
    return str(caches[worker.rsplit("-", 1)[0]] / artifact.id)


def test_two_users_interleaved_tasks_each_run_in_their_own_environment(shared, envs):
    users, caches, _ = shared
    futures = {name: [] for name in users}
    for batch in range(4):  # interleaved: each user submits a batch in turn
        for name, client in users.items():
            with envship.environment(envs[name], client=client):
                futures[name] += client.map(
                    where_it_ran(), range(batch * 10, batch * 10 + 10), pure=False
                )
    for name, client in users.items():
        results = client.gather(futures[name])
        assert sorted(i for i, _ in results) == list(range(40))  # none lost
        allowed = {expected_prefix(caches, w, envs[name]) for w in GROUPS[name]}
        assert {prefix for _, prefix in results} <= allowed
    # Neither user's switch undid the other's: each group is where it was put.
    found = prefixes(users["base"])
    for name, group in GROUPS.items():
        for worker in group:
            assert found[worker] == expected_prefix(caches, worker, envs[name])


def test_a_killed_worker_comes_back_in_its_groups_environment(shared, envs):
    users, caches, _ = shared
    client = users["base"]
    victims = [GROUPS["sklearn-dev"][0], GROUPS["base"][0]]
    addresses = {n: a for a, n in names_by_address(client).items()}
    pids = client.run(os.getpid, workers=[addresses[v] for v in victims])
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not set(pids) & set(names_by_address(client)), timeout=60)
    client.wait_for_workers(4, timeout=60)
    found = prefixes(client)
    for name, group in GROUPS.items():
        for worker in group:
            assert found[worker] == expected_prefix(caches, worker, envs[name])


def test_tasks_needing_an_environment_no_worker_runs(tmp_path, env_prefix, store):
    other = envship.pack(env_prefix("base"), name="nobody-runs-it", store=store)
    with local_cluster(tmp_path, {"node-a": 2}) as (client, caches):
        with pytest.raises(EnvshipError, match="no worker runs in it") as info:
            with envship.environment(other):
                pytest.fail("the block must not run")
        assert "nobody-runs-it" in str(info.value)
        # Asked for a worker: one idle worker is switched first, then used.
        with envship.environment(other, workers=1):
            results = client.gather(client.map(where_it_ran(), range(6), pure=False))
        assert {p for _, p in results} == {str(caches["node-a"] / other.id)}
        assert sorted(prefixes(client).values()).count(sys.prefix) == 1


def test_an_environment_the_administrators_do_not_allow(tmp_path, env_prefix, store):
    allowed = envship.pack(env_prefix("base"), name="vetted", store=store)
    mine = envship.pack(env_prefix("sklearn-dev"), name="mine", store=store)
    policy = {
        "DASK_ENVSHIP__ALLOWED": "vetted",
        "DASK_ENVSHIP__CONTACT": "hpc-help@example.edu",
    }
    with local_cluster(tmp_path, {"node-a": 1}, node_env=policy) as (client, caches):
        with pytest.raises(NotAllowedError, match="hpc-help@example.edu") as info:
            client.use_environment(mine)
        assert "'mine'" in str(info.value) and "vetted" in str(info.value)
        # Refused before anything was shipped.
        assert not list((caches["node-a"] / "archives").glob("*"))
        assert prefixes(client)["node-a-0"] == sys.prefix
        # The scheduler refuses it too, to a client that skips its own check.
        offer = Offer.of_artifact(mine).to_msg()
        assert client.sync(client.scheduler.envship_publish, offer=offer) == "OK"
        with pytest.raises(NotAllowedError):
            client.sync(client.scheduler.envship_desire, id=mine.id)
        assert client.use_environment(allowed).ok
        # And each nanny, to a client that goes around both.
        plugin = UseEnvironment({"id": mine.id, "name": "mine"})
        client.sync(
            client.scheduler.register_nanny_plugin,
            plugin=dumps(plugin),
            name="envship",
            idempotent=False,
        )
        nanny = client.scheduler_info()["workers"]
        nanny = next(iter(nanny.values()))["nanny"]
        status = client.sync(client.rpc(nanny).envship_status)
        assert not status["ok"] and "allow only" in status["error"]
        assert status["running"] == allowed.id


def test_cache_gc_from_a_client_cleans_every_node_once(shared, envs):
    from click.testing import CliRunner

    from envship.cli import main

    users, caches, _ = shared
    # A download left by a process that died: removed; what runs stays.
    leftovers = [caches[n] / "tmp" / f"{'0' * 32}.999999999.dead.part" for n in caches]
    for path in leftovers:
        path.write_bytes(b"half an archive")
    address = users["base"].scheduler.address
    result = CliRunner().invoke(main, ["cache", "gc", "--scheduler", address])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and all("evicted 0 environment(s)" in li for li in lines)
    assert not any(path.exists() for path in leftovers)
    outcome = envship.gc(users["base"])
    assert len(outcome) == 2 and all(o["size"] > 0 for o in outcome.values())
    for cache in caches.values():
        assert all((cache / a.id).is_dir() for a in envs.values())


def test_workers_that_come_back_elsewhere_take_their_groups_environment(shared, envs):
    # Both workers of node-a die with their machine; the job scheduler starts
    # them again, with the same names, on a machine that has nothing cached.
    users, caches, cluster = shared
    client = users["base"]
    cluster.kill_node("node-a")
    wait_until(lambda: len(names_by_address(client)) == 2, timeout=60)
    cluster.add_node("node-c", 2, names=["node-a-0", "node-a-1"])
    client.wait_for_workers(4, timeout=90)
    found = prefixes(client)
    assert found["node-a-0"] == str(caches["node-c"] / envs["sklearn-dev"].id)
    assert found["node-a-1"] == str(caches["node-c"] / envs["base"].id)
