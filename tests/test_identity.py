"""Workers started without a name, and nannies started without the preload.

Real ``dask worker`` processes without ``--name`` (``--nworkers 2``, as an
administrator types it): Dask names each worker after its own address, which
a switch changes. envship identifies them by their nanny's address instead,
in the switch report, ``status``, ``workers=[...]`` and the registry's rules.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import envship
from envship.errors import EnvshipError
from fixtures.cluster import NannyCluster, local_cluster, spawn, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_unnamed(
    cluster: NannyCluster, cache: Path, log: str, extra: list[str]
) -> subprocess.Popen:
    """``dask worker SCHEDULER --nanny --preload-nanny envship`` without ``--name``."""
    args = [
        "distributed.cli.dask_worker",
        cluster.address,
        "--nanny",
        "--nthreads",
        "1",
        "--host",
        "127.0.0.1",
        "--no-dashboard",
        "--local-directory",
        str(cluster.folder / "work"),
        "--preload-nanny",
        "envship",
        *extra,
    ]
    env = {**cluster.env, "DASK_ENVSHIP__CACHE__DIRECTORY": str(cache)}
    process = spawn(cluster.python, args, env, cluster.folder / log)
    cluster.processes.append(process)
    return process


@pytest.fixture(scope="module")
def unnamed(tmp_path_factory):
    """Node a: ``--nworkers 2``; node b: one nanny on a fixed ``--nanny-port``."""
    folder = tmp_path_factory.mktemp("unnamed")
    port = free_port()
    with local_cluster(folder, {}) as cluster:
        start_unnamed(cluster, folder / "a-cache", "a.log", ["--nworkers", "2"])
        start_unnamed(cluster, folder / "b-cache", "b.log", ["--nanny-port", str(port)])
        cluster.client.wait_for_workers(3, timeout=60)
        yield cluster, f"tcp://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def venv(env_prefix, tmp_path_factory):
    return envship.pack(env_prefix("venv"), store=tmp_path_factory.mktemp("store"))


def workers(client) -> dict[str, str]:
    """Nanny address -> its worker's address now."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    return {w["nanny"]: a for a, w in info.items()}


def prefixes(client) -> dict[str, str]:
    """Nanny address -> the ``sys.prefix`` its worker runs in."""
    by_worker = client.run(lambda: __import__("sys").prefix)
    return {n: by_worker[a] for n, a in workers(client).items()}


def test_unnamed_workers_are_named_by_their_nanny_across_switches(unnamed, venv):
    cluster, _ = unnamed
    client = cluster.client
    info = client.scheduler_info(n_workers=-1)["workers"]
    assert all(w["name"] == a for a, w in info.items())  # what Dask gives them
    before = workers(client)

    report = client.use_environment(venv, progress=False)
    assert report.ok and set(report) == set(before)  # the nannies' addresses
    # Preloaded nannies have envship: no setup plugin was registered for them.
    plugins = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.nanny_plugins
    )
    assert set(plugins) == {"envship"}
    after = workers(client)
    assert set(after) == set(before)
    # The report's names still name the workers, each with its address now.
    for nanny, r in report.items():
        assert r.nanny == nanny and r.address == after[nanny]

    # A second switch by the report's names; or by a worker's current
    # address; or by its nanny's address written without tcp://.
    one, two, _ = sorted(report)
    back = subprocess.run(
        [sys.executable, "-m", "envship.cli", "use", "none", "--worker", one],
        capture_output=True,
        text=True,
        env={**os.environ, "DASK_SCHEDULER_ADDRESS": cluster.address},
    )
    assert back.returncode == 0, back.stderr
    assert one in back.stdout and "ok" in back.stdout
    assert prefixes(client)[one] == sys.prefix
    again = client.use_environment(
        venv, workers=[workers(client)[one], two.removeprefix("tcp://")], progress=False
    )
    assert again.ok and set(again) == {one, two}
    assert set(prefixes(client).values()) == {
        str(cluster.folder / cache / venv.id) for cache in ("a-cache", "b-cache")
    }

    gone = re.escape(before[one])
    with pytest.raises(EnvshipError, match=f"no such workers: {gone}") as e:
        client.use_environment(None, workers=[before[one]], progress=False)
    assert one in str(e.value)  # the names it takes are listed


def test_status_and_registry_name_them_by_their_nanny(unnamed, venv):
    cluster, fixed = unnamed
    client = cluster.client
    client.use_environment(None, progress=False)  # no rules left
    report = client.use_environment(venv, workers=[fixed], progress=False)
    assert report.ok and set(report) == {fixed}, report
    now = workers(client)
    rows = envship.status(client).workers
    assert {r["name"]: r["address"] for r in rows} == now
    assert all(r["name"] == r["nanny"] for r in rows)
    assert {r["environment"] for r in rows if r["name"] == fixed} == {venv.name}
    registry = client.sync(client.scheduler.envship_registry)
    assert registry["by_name"] == {fixed: venv.id}


def test_a_crashed_worker_keeps_its_name_and_environment(unnamed, venv):
    cluster, _ = unnamed
    client = cluster.client
    client.use_environment(None, progress=False)
    nanny = sorted(n for n in workers(client) if n != unnamed[1])[0]
    assert client.use_environment(venv, workers=[nanny], progress=False).ok
    old = workers(client)[nanny]
    os.kill(client.run(os.getpid, workers=[old])[old], signal.SIGKILL)
    wait_until(lambda: workers(client).get(nanny, old) != old)
    # The nanny restarted it, on a new address, in the same environment.
    assert prefixes(client)[nanny] == str(cluster.folder / "a-cache" / venv.id)
    rows = {r["name"]: r for r in envship.status(client).workers}
    assert rows[nanny]["id"] == venv.id
    assert rows[nanny]["address"] == workers(client)[nanny] != old
    report = client.use_environment(None, workers=[nanny], progress=False)
    assert report.ok and set(report) == {nanny}


def test_the_registry_rule_follows_a_nanny_that_comes_back(unnamed, venv, tmp_path):
    # The nanny on a fixed port is killed and started again, on a node with
    # an empty cache: only the registry's rule for its identity can tell it
    # what to run (the cluster default is the nannies' own environment).
    cluster, fixed = unnamed
    client = cluster.client
    client.use_environment(None, progress=False)
    holder = sorted(n for n in workers(client) if n != fixed)[0]
    assert client.use_environment(venv, workers=[fixed, holder], progress=False).ok
    process = next(p for p in cluster.processes if "--nanny-port" in p.args)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    wait_until(lambda: fixed not in workers(client))
    port = fixed.rsplit(":", 1)[1]
    start_unnamed(cluster, tmp_path / "fresh", "b2.log", ["--nanny-port", port])
    client.wait_for_workers(3, timeout=60)
    wait_until(lambda: fixed in workers(client))
    assert prefixes(client)[fixed] == str(tmp_path / "fresh" / venv.id)
    others = {p for n, p in prefixes(client).items() if n not in (fixed, holder)}
    assert others == {sys.prefix}


LOGS = ["bare-0.log", "bare-1.log", "scheduler.log"]


def test_nannies_without_the_preload_log_no_traceback(tmp_path, venv):
    with local_cluster(tmp_path, {"bare": 2}, preload=False) as cluster:
        client = cluster.client
        assert envship.gc(client) == {}  # no envship on any node yet
        rows = envship.status(client).workers
        assert all("not set up" in r["unreachable"] for r in rows)
        assert client.use_environment(venv, progress=False).ok
        assert len(envship.gc(client)) == 1  # one node, one cache
        assert {r["id"] for r in envship.status(client).workers} == {venv.id}
        # Read now: what the processes log when stopped is not the point.
        logs = {log: (tmp_path / log).read_text() for log in LOGS}
    for log, text in logs.items():
        for sign in ["Traceback", "KeyError", "No handler"]:
            assert sign not in text, f"{sign} in {log}:\n{text}"
