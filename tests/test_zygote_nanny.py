"""Zygotes wired into the nanny, on a real cluster (``dask worker --nanny
--preload-nanny envship`` processes on 127.0.0.1) and the "base" fixture.

A worker forked by a zygote has the zygote as its parent; a plainly started
one has its nanny.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import cloudpickle
import dask
import psutil
import pytest
from distributed import Nanny, Scheduler

import envship
from envship.node import zygotes
from envship.node.worker_environ import TargetEnvironment
from envship.node.worker_process import switch
from envship.node.zygote import ForkedWorker
from fixtures.cluster import local_cluster, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:base lacks numpy:UserWarning"),
]


def describe() -> dict:
    import os
    import sys

    return {"prefix": sys.prefix, "pid": os.getpid(), "ppid": os.getppid()}


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def is_zygote(pid: int) -> bool:
    return any(arg.endswith("zygote.py") for arg in psutil.Process(pid).cmdline())


def the_worker(client) -> dict:
    """The one worker's description, as it reports it."""
    [info] = client.run(describe).values()
    return info


def wait_for_new_worker(client, old_pid: int) -> dict:
    """Wait until the one worker is back with another pid; describe it."""

    def back() -> bool:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if len(workers) != 1:
            return False
        try:
            return the_worker(client)["pid"] != old_pid
        except Exception:
            return False

    wait_until(back, timeout=60)
    return the_worker(client)


def restart(client) -> dict:
    old = the_worker(client)["pid"]
    client.restart_workers(list(client.scheduler_info()["workers"]))
    return wait_for_new_worker(client, old)


@pytest.fixture(scope="module")
def base(env_prefix, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return envship.pack(env_prefix("base"), name="base", store=store)


def test_workers_fork_from_a_zygote_per_environment(tmp_path, base):
    zygote_pids = set()
    with local_cluster(tmp_path, {"node": 1}) as cluster:
        client, caches = cluster
        [nanny] = cluster.nannies["node"]
        prefix = str(caches["node"] / base.id)

        report = client.use_environment(base)
        assert report.ok, report
        info = the_worker(client)
        assert info["prefix"] == prefix
        zygote = info["ppid"]
        assert zygote != nanny.pid and is_zygote(zygote)
        assert psutil.Process(zygote).ppid() == nanny.pid
        zygote_pids.add(zygote)

        # restart_workers and a crash: back in the environment, same zygote.
        info = restart(client)
        assert (info["prefix"], info["ppid"]) == (prefix, zygote)
        os.kill(info["pid"], signal.SIGKILL)
        info = wait_for_new_worker(client, info["pid"])
        assert (info["prefix"], info["ppid"]) == (prefix, zygote)

        # Back to the nanny's own environment (plain start), then in again:
        # the zygote was kept and is reused.
        assert client.use_environment(None).ok
        info = the_worker(client)
        assert (info["prefix"], info["ppid"]) == (sys.prefix, nanny.pid)
        assert not pid_gone(zygote)
        assert client.use_environment(base).ok
        info = the_worker(client)
        assert (info["prefix"], info["ppid"]) == (prefix, zygote)

        # A zygote killed by hand: the next start still brings the worker
        # up in the environment (from a new zygote, or plainly).
        os.kill(zygote, signal.SIGKILL)
        wait_until(lambda: pid_gone(zygote))
        info = restart(client)
        assert info["prefix"] == prefix
        assert info["ppid"] != zygote and is_zygote(info["ppid"])
        zygote_pids.add(info["ppid"])
        info = restart(client)
        assert info["prefix"] == prefix

    # No zygote outlives the cluster.
    for pid in zygote_pids:
        wait_until(lambda pid=pid: pid_gone(pid), timeout=30)


def test_zygotes_off_starts_workers_plainly(tmp_path, base):
    node_env = {"DASK_ENVSHIP__ZYGOTE__ENABLED": "False"}
    with local_cluster(tmp_path, {"node": 1}, node_env=node_env) as cluster:
        client, caches = cluster
        [nanny] = cluster.nannies["node"]
        assert client.use_environment(base).ok
        info = the_worker(client)
        assert info["prefix"] == str(caches["node"] / base.id)
        assert info["ppid"] == nanny.pid
        info = restart(client)
        assert info["prefix"] == str(caches["node"] / base.id)
        assert info["ppid"] == nanny.pid


def test_closing_the_nanny_closes_its_zygote(env_prefix):
    target = TargetEnvironment("base", env_prefix("base"), "conda", "base")

    async def main():
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as s:
            nanny = await Nanny(s.address, host="127.0.0.1", nthreads=1, name="z")
            try:
                r = await switch(nanny, target)
                assert r["ok"], r["error"]
                worker = nanny.process.process
                assert isinstance(worker, ForkedWorker)
                [zygote] = zygotes.zygotes().values()
                assert worker.zygote is zygote
                assert psutil.Process(worker.pid).ppid() == zygote.pid
            finally:
                await nanny.close()
            deadline = time.monotonic() + 30
            while zygotes.zygotes() or not pid_gone(zygote.pid):
                assert time.monotonic() < deadline, "the zygote outlived its nanny"
                await asyncio.sleep(0.05)
            assert pid_gone(worker.pid)

    asyncio.run(main())


def test_zygotes_nobody_runs_in_are_closed_beyond_keep(env_prefix):
    target = TargetEnvironment("base", env_prefix("base"), "conda", "base")

    async def main():
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as s:
            async with Nanny(s.address, host="127.0.0.1", nthreads=1) as nanny:
                with dask.config.set({"envship.zygote.keep": 0}):
                    assert (await switch(nanny, target))["ok"]
                    [zygote] = zygotes.zygotes().values()
                    assert (await switch(nanny, None))["ok"]
                    assert zygotes.zygotes() == {}
                    deadline = time.monotonic() + 30
                    while not pid_gone(zygote.pid):
                        assert time.monotonic() < deadline, "the zygote stayed"
                        await asyncio.sleep(0.05)

    asyncio.run(main())


def test_zygotes_beyond_keep_memory_are_closed(env_prefix):
    target = TargetEnvironment("base", env_prefix("base"), "conda", "base")

    async def main():
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as s:
            async with Nanny(s.address, host="127.0.0.1", nthreads=1) as nanny:
                limits = {
                    "envship.zygote.keep": 5,
                    "envship.zygote.keep-memory": "1 MiB",
                }
                with dask.config.set(limits):
                    assert (await switch(nanny, target))["ok"]
                    [state] = zygotes.states()
                    assert (state["id"], state["name"]) == ("base", "base")
                    assert state["rss"] > 2**20  # an interpreter with distributed
                    # The worker runs in it: kept whatever its memory; once
                    # no worker does, 1 MiB holds none.
                    assert (await switch(nanny, None))["ok"]
                    assert zygotes.states() == []
                    deadline = time.monotonic() + 30
                    while not pid_gone(state["pid"]):
                        assert time.monotonic() < deadline, "the zygote stayed"
                        await asyncio.sleep(0.05)

    asyncio.run(main())


def zygote_children(pid: int) -> list[psutil.Process]:
    """The zygotes among the children of process ``pid``."""
    return [c for c in psutil.Process(pid).children() if is_zygote(c.pid)]


def test_prepare_starts_the_zygote_before_the_switch(tmp_path, base):
    with local_cluster(tmp_path, {"node": 1}) as cluster:
        client, caches = cluster
        [nanny] = cluster.nannies["node"]
        assert zygote_children(nanny.pid) == []
        assert envship.prepare_environment(client, base, progress=False).ok
        python = str(caches["node"] / base.id / "bin" / "python")
        wait_until(lambda: len(zygote_children(nanny.pid)) == 1, timeout=60)
        [zygote] = zygote_children(nanny.pid)
        assert zygote.cmdline()[0] == python
        # The workers computed in the nanny's own environment meanwhile; the
        # switch forks from the zygote the prepare started.
        assert the_worker(client)["prefix"] == sys.prefix
        assert client.use_environment(base).ok
        info = the_worker(client)
        assert (info["prefix"], info["ppid"]) == (
            str(caches["node"] / base.id),
            zygote.pid,
        )


def test_the_nannies_of_a_node_share_one_zygote(tmp_path, base):
    with local_cluster(tmp_path, {"node": 2}) as cluster:
        client, caches = cluster
        first, second = cluster.nannies["node"]
        assert client.use_environment(base).ok
        prefix = str(caches["node"] / base.id)
        infos = client.run(describe)
        assert {i["prefix"] for i in infos.values()} == {prefix}
        # One zygote forked both workers; one of the two nannies started it.
        [zygote] = {i["ppid"] for i in infos.values()}
        assert is_zygote(zygote)
        starter = psutil.Process(zygote).ppid()
        assert starter in (first.pid, second.pid)
        other = second if starter == first.pid else first
        assert zygote_children(other.pid) == []

        # The nanny that started it dies: its worker goes with it, the other
        # nanny's worker lives on and restarts from the same zygote.
        os.kill(starter, signal.SIGKILL)
        wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 1)
        [address] = client.scheduler_info(n_workers=-1)["workers"]
        old = client.run(describe, workers=[address])[address]["pid"]
        client.restart_workers([address])

        def restarted():
            workers = client.scheduler_info(n_workers=-1)["workers"]
            if len(workers) != 1:
                return None
            [info] = client.run(describe).values()
            return info if info["pid"] != old else None

        wait_until(lambda: restarted() is not None)
        info = restarted()
        assert (info["prefix"], info["ppid"]) == (prefix, zygote)
    # Its last nanny closed: the zygote is gone.
    wait_until(lambda: pid_gone(zygote), timeout=30)
