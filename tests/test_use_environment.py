"""client.use_environment on a real cluster: two nodes (cache directories) with
two nannies each, started with ``dask worker --preload-nanny envship``."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import zstandard
from distributed import Client

import envship
from envship.archive import ContentHasher, file_digest
from envship.client.store import Artifact
from envship.errors import EnvshipError, IncompatibleEnvironmentError
from envship.manifest import Manifest
from envship.node.cache import EnvCache
from fixtures.cluster import local_cluster, wait_until

# Functions of this module run on workers inside shipped environments, where
# the module itself cannot be imported: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODES = {"node-a": 2, "node-b": 2}


def prefix_and_sklearn() -> tuple[str, str | None]:
    try:
        import sklearn
    except ImportError:
        return sys.prefix, None
    return sys.prefix, sklearn.__version__


def fit_score() -> float:
    from sklearn.linear_model import LinearRegression

    return float(LinearRegression().fit([[0], [1], [2]], [0, 2, 4]).coef_[0])


def worker_pid() -> int:
    return os.getpid()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    with local_cluster(folder, NODES) as (client, caches):
        yield client, caches


@pytest.fixture(scope="module")
def sklearn_dev(env_prefix, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return envship.pack(env_prefix("sklearn-dev"), name="sklearn-dev", store=store)


def node_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def where(client) -> dict[str, tuple[str, str | None]]:
    """Worker name -> (sys.prefix, scikit-learn version), asked inside each worker."""
    names = {
        a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
    }
    return {names[a]: tuple(v) for a, v in client.run(prefix_and_sklearn).items()}


def test_switch_there_and_back(cluster, sklearn_dev):
    client, caches = cluster
    report = client.use_environment(sklearn_dev)
    assert report.ok and set(report) == {f"{n}-{i}" for n in NODES for i in range(2)}
    assert {r.environment for r in report.values()} == {sklearn_dev.id}

    for name, (prefix, version) in where(client).items():
        assert prefix == str(caches[node_of(name)] / sklearn_dev.id)
        assert version == "1.9.1"
    # A lambda: plain pickle (tried first) would send fit_score by reference.
    assert client.submit(lambda: fit_score(), pure=False).result() == pytest.approx(2)

    # Shipped once per node and extracted once per node, not per nanny.
    archives = {}
    for node, cache in caches.items():
        assert len(EnvCache(cache).installs(sklearn_dev.id)) == 1
        archive = EnvCache(cache).archive_path(sklearn_dev.id)
        archives[node] = archive.stat().st_ino

    report = client.use_environment(None)
    assert report.ok and {r.environment for r in report.values()} == {None}
    assert {prefix for prefix, _ in where(client).values()} == {sys.prefix}

    report = client.use_environment(sklearn_dev)
    assert report.ok
    for node, cache in caches.items():
        assert len(EnvCache(cache).installs(sklearn_dev.id)) == 1  # no extraction
        assert (
            EnvCache(cache).archive_path(sklearn_dev.id).stat().st_ino == archives[node]
        )
    assert {v for _, v in where(client).values()} == {"1.9.1"}


def test_environment_survives_crash_and_restart(cluster, sklearn_dev):
    client, caches = cluster
    client.use_environment(sklearn_dev)
    pids = client.run(worker_pid)
    victim, pid = next(iter(pids.items()))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: victim not in client.scheduler_info(n_workers=-1)["workers"])
    client.wait_for_workers(4, timeout=60)
    assert {v for _, v in where(client).values()} == {"1.9.1"}

    before = set(client.scheduler_info(n_workers=-1)["workers"])
    client.restart_workers(list(before))
    # restart_workers may return before the nannies have started new workers.
    wait_until(
        lambda: (
            len(workers := set(client.scheduler_info(n_workers=-1)["workers"])) == 4
            and not workers & before
        ),
        timeout=60,
    )
    for name, (prefix, version) in where(client).items():
        assert prefix == str(caches[node_of(name)] / sklearn_dev.id)
        assert version == "1.9.1"


def test_incompatible_python_is_refused_before_any_restart(cluster, env_prefix, store):
    client, _ = cluster
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    with pytest.raises(IncompatibleEnvironmentError) as info:
        client.use_environment(env_prefix("py312"))
    assert "python" in str(info.value) and "3.12" in str(info.value)
    assert "envship.foreign(client, " in str(info.value)  # the way to call into it
    with pytest.raises(IncompatibleEnvironmentError, match="distributed"):
        client.use_environment(env_prefix("no-distributed"))
    assert set(client.scheduler_info(n_workers=-1)["workers"]) == before


def broken_copy(prefix: Path, dest: Path) -> Path:
    """A venv whose distributed fails on import, though its metadata looks fine."""
    subprocess.run(["cp", "-a", prefix, dest], check=True)
    init = next(dest.glob("lib/python3.*/site-packages/distributed/__init__.py"))
    init.write_text("raise ImportError('broken on purpose')\n")
    shutil.rmtree(init.parent / "__pycache__")
    return dest


def test_broken_environment_falls_back_and_reports(
    cluster, env_prefix, store, tmp_path
):
    client, _ = cluster
    broken = broken_copy(env_prefix("venv"), tmp_path / "broken-venv")
    with pytest.raises(EnvshipError) as info:
        client.use_environment(broken)
    report = info.value.report
    assert not any(r.ok for r in report.values())
    assert all("broken on purpose" in r.error for r in report.values())
    assert {r.environment for r in report.values()} == {None}
    client.wait_for_workers(4, timeout=60)
    assert {prefix for prefix, _ in where(client).values()} == {sys.prefix}
    assert client.submit(sum, [1, 2, 3]).result() == 6


def malicious_artifact(store: Path, kind: str) -> Artifact:
    """A hand-made archive that claims to be a fine environment."""
    hasher = ContentHasher()
    raw = io.BytesIO()
    declared = 1000
    with tarfile.open(fileobj=raw, mode="w") as tar:

        def add(name, data=b"", **attrs):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data))
            if info.issym():
                hasher.add_symlink(name, info.linkname)
            else:
                hasher.add_file(name, info.mode, file_digest(data))

        add("bin/python", b"#!/bin/sh\n", mode=0o755)
        if kind == "traversal":
            add("../../escaped.txt", b"gotcha")
        elif kind == "symlink":
            add("lib/evil", type=tarfile.SYMTYPE, linkname="../../../../etc")
        elif kind == "bomb":
            add("lib/big.bin", b"\0" * (declared * 100))
    artifact_id = hasher.hexdigest()
    path = store / f"{artifact_id}.tar.zst"
    store.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    manifest = {
        "id": artifact_id,
        "name": f"evil-{kind}",
        "kind": "venv",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}.0",
        "packages": {"distributed": __import__("distributed").__version__},
        "platform": envship.machine.platform_facts(),
        "file_count": 2,
        "unpacked_size": declared,
        "packed_size": path.stat().st_size,
        "created": "2026-01-01T00:00:00+00:00",
    }
    (store / f"{artifact_id}.json").write_text(json.dumps(manifest))
    return Artifact(artifact_id, manifest["name"], path, Manifest.from_dict(manifest))


@pytest.mark.parametrize("kind", ["traversal", "symlink", "bomb"])
def test_malicious_archives_leave_workers_and_cache_intact(
    cluster, sklearn_dev, store, kind
):
    client, caches = cluster
    client.use_environment(sklearn_dev)
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    evil = malicious_artifact(store, kind)
    # The extractor's refusal itself, not any error before it gets there.
    refusal = {
        "traversal": "unsafe entry '../../escaped.txt'",
        "symlink": "unsafe entry 'lib/evil'",
        "bomb": "an archive bomb",
    }[kind]
    with pytest.raises(EnvshipError, match=re.escape(refusal)) as info:
        client.use_environment(evil, strict=False)
    assert f"evil-{kind}" in str(info.value)
    assert set(client.scheduler_info(n_workers=-1)["workers"]) == before
    for cache in caches.values():
        node = EnvCache(cache)
        assert not node.has(evil.id) and not node.has_archive(evil.id)
        assert node.has(sklearn_dev.id)
        assert not list((cache / "tmp").iterdir())
    assert not (caches["node-a"].parent / "escaped.txt").exists()
    assert {v for _, v in where(client).values()} == {"1.9.1"}


def test_data_only_on_switched_workers_gives_a_warning(cluster, sklearn_dev):
    client, _ = cluster
    client.use_environment(sklearn_dev)
    future = client.scatter({"numbers": list(range(1000))})
    with pytest.warns(UserWarning, match="alone holds? 1 key;"):
        client.use_environment(sklearn_dev)
    del future


def test_nannies_without_preload_get_the_plugin(tmp_path, env_prefix, store):
    base = envship.pack(env_prefix("base"), store=store)
    with local_cluster(tmp_path / "c", {"solo": 1}, preload=False) as (client, caches):
        report = client.use_environment(base)
        assert report.ok
        assert where(client) == {"solo-0": (str(caches["solo"] / base.id), None)}


def test_a_new_scheduler_switches_nodes_that_hold_the_environment(
    tmp_path, env_prefix, store
):
    # A LocalCluster restarted in a notebook: a new scheduler knows no offer,
    # while the node's cache (the same folder) still holds the environment.
    base = envship.pack(env_prefix("base"), store=store)
    with local_cluster(tmp_path / "c", {"solo": 1}) as (client, caches):
        assert client.use_environment(base).ok
    with local_cluster(tmp_path / "c", {"solo": 1}) as (client, caches):
        report = client.use_environment(base)
        assert report.ok
        assert not report.transfer.nodes  # nothing shipped: published only
        assert where(client) == {"solo-0": (str(caches["solo"] / base.id), None)}


def test_eviction_never_removes_an_environment_in_use(tmp_path, env_prefix, store):
    base = envship.pack(env_prefix("base"), store=store)
    venv = envship.pack(env_prefix("venv"), store=store)
    budget = {"DASK_ENVSHIP__CACHE__MAX_SIZE": "200 MB"}  # not both (150 + 70 MB)
    with local_cluster(tmp_path / "c", {"tiny": 1}, node_env=budget) as (
        client,
        caches,
    ):
        cache = EnvCache(caches["tiny"], max_size="200 MB")
        assert client.use_environment(base).ok
        assert client.use_environment(venv).ok
        # base was in use while venv was installed over budget: still there.
        assert cache.has(base.id) and cache.has(venv.id)
        assert where(client)["tiny-0"][0] == str(caches["tiny"] / venv.id)
        assert client.use_environment(base).ok
        assert where(client)["tiny-0"][0] == str(caches["tiny"] / base.id)
        # Now venv is unused: the next install over budget may evict it, base never.
        cache.gc()
        assert cache.has(base.id)
        assert not cache.has(venv.id)


def test_what_was_installed_is_not_evicted_before_its_restart(
    tmp_path, env_prefix, store
):
    base = envship.pack(env_prefix("base"), store=store)
    venv = envship.pack(env_prefix("venv"), store=store)
    budget = {"DASK_ENVSHIP__CACHE__MAX_SIZE": "160 MB"}  # one of them (150, 70 MB)
    with local_cluster(tmp_path / "c", {"tiny": 1}, node_env=budget) as (
        client,
        caches,
    ):
        cache = EnvCache(caches["tiny"], max_size="160 MB")
        assert client.prepare_environment(base).ok
        # Installing venv goes over budget; base, installed but not yet
        # switched to, is not evicted for it.
        assert client.prepare_environment(venv).ok
        assert cache.has(base.id) and cache.has(venv.id)
        report = client.use_environment(base)
        assert report.ok and not report.transfer.client_bytes  # nothing shipped
        assert [u["written"] + u["linked"] for u in report.unpacked.values()] == [0]
        assert where(client)["tiny-0"][0] == str(caches["tiny"] / base.id)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_nanny_restarted_after_its_scheduler_comes_back_in_its_environment(
    tmp_path, env_prefix, store
):
    # A nanny closes when its scheduler goes away; whatever restarts it (a job
    # scheduler, systemd) starts it with the same name, on the same node.
    from fixtures.cluster import nanny_args, scheduler_args, spawn, stop

    base = envship.pack(env_prefix("base"), store=store)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = scheduler_args(port)
    nanny = nanny_args(address, "steady", tmp_path / "work")
    env = {**os.environ, "DASK_ENVSHIP__CACHE__DIRECTORY": str(tmp_path / "cache")}
    processes = []

    def start(args, log):
        processes.append(spawn(sys.executable, args, env, tmp_path / log))
        return processes[-1]

    try:
        first_scheduler = start(scheduler, "scheduler.log")
        start(nanny, "nanny.log")
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.use_environment(base).ok
        os.killpg(first_scheduler.pid, signal.SIGKILL)
        first_scheduler.wait()
        wait_until(lambda: processes[1].poll() is not None)  # the nanny closed
        start(scheduler, "scheduler.log")
        start(nanny, "nanny.log")  # restarted, as a job scheduler would
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            assert where(client)["steady"][0] == str(tmp_path / "cache" / base.id)
            # Back to its own: it is forgotten.
            assert client.use_environment(None).ok
        assert not list((tmp_path / "cache" / "nannies").iterdir())
    finally:
        stop(processes)


def test_an_administrators_default_environment(tmp_path, env_prefix, store):
    # The administrator packs an environment onto a shared filesystem and
    # names its archive in the nannies' config: workers start in it, and
    # use_environment(None) goes back to it, not to the nannies' own.
    base = envship.pack(env_prefix("base"), name="site-default", store=store)
    sklearn = envship.pack(env_prefix("sklearn-dev"), store=store)
    default = {"DASK_ENVSHIP__DEFAULT_ENVIRONMENT": str(base.path)}
    with local_cluster(tmp_path, {"node-a": 1}, node_env=default) as cluster:
        client, caches = cluster
        assert where(client)["node-a-0"][0] == str(caches["node-a"] / base.id)
        assert client.use_environment(sklearn).ok
        assert where(client)["node-a-0"] == (
            str(caches["node-a"] / sklearn.id),
            "1.9.1",
        )
        report = client.use_environment(None)
        assert report.ok and report["node-a-0"].environment == base.id
        assert where(client)["node-a-0"][0] == str(caches["node-a"] / base.id)
        # A default that cannot be used: the worker comes up in the nanny's own.
        missing = {"DASK_ENVSHIP__DEFAULT_ENVIRONMENT": str(tmp_path / "gone.tar.zst")}
        cluster.add_node("node-b", 1, env=missing)
        client.wait_for_workers(2, timeout=60)
        assert where(client)["node-b-0"][0] == sys.prefix


def test_switch_some_workers_only(cluster, sklearn_dev):
    client, caches = cluster
    client.use_environment(None)
    report = client.use_environment(sklearn_dev, workers=["node-a-0", "node-b-1"])
    assert set(report) == {"node-a-0", "node-b-1"} and report.ok
    found = where(client)
    assert found["node-a-0"] == (str(caches["node-a"] / sklearn_dev.id), "1.9.1")
    assert found["node-b-1"] == (str(caches["node-b"] / sklearn_dev.id), "1.9.1")
    assert found["node-a-1"] == found["node-b-0"] == (sys.prefix, None)
    with pytest.raises(EnvshipError, match="no such workers: nobody"):
        client.use_environment(sklearn_dev, workers=["nobody"])


def test_a_switch_under_way_refuses_another_of_the_same_workers(cluster, sklearn_dev):
    client, _ = cluster
    client.use_environment(None)
    nannies = {
        w["name"]: w["nanny"]
        for w in client.scheduler_info(n_workers=-1)["workers"].values()
    }
    with Client(client.scheduler.address) as other:
        # Another client's switch of node-a-0 is under way.
        other.sync(
            other.scheduler.envship_claim,
            owner=f"{other.id}/call",
            client=other.id,
            nannies=[nannies["node-a-0"]],
            name="other-env",
        )
        with pytest.raises(
            EnvshipError, match=rf"(?s)under way.*node-a-0: to other-env, by {other.id}"
        ):
            client.use_environment(sklearn_dev)
        assert {prefix for prefix, _ in where(client).values()} == {sys.prefix}
        # Other workers are free.
        assert client.use_environment(sklearn_dev, workers=["node-b-0"]).ok
    # Its client gone, its claim is void.
    assert client.use_environment(sklearn_dev).ok


def test_concurrent_switches_never_both_claim_the_same_workers(cluster, sklearn_dev):
    client, _ = cluster
    client.use_environment(None)
    with Client(client.scheduler.address) as other:
        results = {}

        def switch(who, c, env):
            try:
                results[who] = c.use_environment(env, progress=False)
            except EnvshipError as e:
                results[who] = e

        threads = [
            threading.Thread(target=switch, args=("a", client, sklearn_dev)),
            threading.Thread(target=switch, args=("b", other, None)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    asked = {"a": sklearn_dev.id, "b": None}
    done = {who: r for who, r in results.items() if not isinstance(r, Exception)}
    assert done  # at least one of them switched
    for who, r in results.items():
        if who in done:
            # Told ok only if every worker ran in what it asked, when it ended.
            assert r.ok and {w.environment for w in r.values()} == {asked[who]}
        else:
            assert "under way" in str(r)
    if len(done) == 1:  # the other was refused: the workers run what won asked
        (who,) = done
        version = None if asked[who] is None else "1.9.1"
        assert {v for _, v in where(client).values()} == {version}


def test_nannies_that_cannot_import_envship(tmp_path, env_prefix, store):
    # Scheduler and nannies run in the base fixture: distributed, no envship.
    python = str(env_prefix("base") / "bin" / "python")
    artifact = envship.pack(env_prefix("base"), store=store)
    with local_cluster(tmp_path / "c", {"bare": 1}, preload=False, python=python) as (
        client,
        _,
    ):
        with pytest.raises(EnvshipError, match="cannot load envship") as info:
            client.use_environment(artifact)
        assert "docs/install.md" in str(info.value)
        assert client.submit(sum, [1, 2]).result() == 3


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_prepare_ships_and_installs_while_workers_compute(cluster, env_prefix, store):
    client, caches = cluster
    venv = envship.pack(env_prefix("venv"), store=store)
    pids = client.run(worker_pid)
    # A lambda: plain pickle (tried first) would send the function by reference.
    running = client.submit(lambda: sleep_then_pid(3), pure=False)

    report = client.prepare_environment(venv)
    assert report.ok and set(report) == {f"{n}-{i}" for n in NODES for i in range(2)}
    assert venv.id not in {r.environment for r in report.values()}
    assert report.transfer.client_bytes >= venv.size
    assert len(report.unpacked) == len(NODES)  # one nanny per node unpacked it
    assert all(
        u["written"] + u["linked"] == venv.manifest.file_count
        for u in report.unpacked.values()
    )
    assert f"unpacked on {len(NODES)} node(s)" in repr(report)
    for cache in caches.values():
        assert EnvCache(cache).has(venv.id)
    # Nobody restarted: the task finished where it began, every pid is the same.
    assert running.result() in pids.values()
    assert client.run(worker_pid) == pids
    running.release()

    switched = client.use_environment(venv)
    assert switched.ok and switched.transfer.client_bytes == 0
    assert {(u["written"], u["linked"]) for u in switched.unpacked.values()} == {(0, 0)}
    assert {r.environment for r in switched.values()} == {venv.id}
    for cache in caches.values():
        assert len(EnvCache(cache).installs(venv.id)) == 1
    with pytest.raises(EnvshipError, match="nothing to prepare"):
        envship.prepare(client, None)
