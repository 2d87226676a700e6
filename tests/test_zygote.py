"""Tests for bootstrap/zygote.py and envship.node.zygote, with real environments.

A zygote runs under a fixture environment's python ("base"; "sklearn-dev"
for numpy) and forks workers that join a real scheduler on 127.0.0.1. No
nanny is involved: the nanny's use of it is tested in tests/test_zygote_nanny.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed import Client, Scheduler

from envship.node.worker_environ import TargetEnvironment, child_environ
from envship.node.zygote import (
    UNKNOWN_EXIT,
    ForkedWorker,
    ForkRefused,
    Zygote,
    ZygoteError,
)
from fixtures.worker_setup import PRE_SPAWN, setup_frame

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent


def worker_env(prefix: Path, **extra: str) -> dict[str, str]:
    target = TargetEnvironment("test", Path(prefix), "conda", prefix.name)
    return {**child_environ(target, os.environ, PRE_SPAWN), **extra}


async def start_worker(zygote: Zygote, env, scheduler: str, name: str, tmp_path):
    worker = ForkedWorker(zygote, env)
    worker.start(setup_frame(scheduler, name, tmp_path / name))
    report = json.loads(await worker.wait_report(60))
    assert "address" in report, report
    return worker, report


async def stop_worker(worker: ForkedWorker) -> None:
    worker.send_stop({"op": "stop", "timeout": 10, "reason": "test"})
    await worker.join(30)
    worker.close()


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (its parent, our child, was killed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_forked_worker_joins_scheduler_and_runs_in_environment(env_prefix, tmp_path):
    prefix = env_prefix("base")
    # Variables are the request's, set after the fork, not the zygote's.
    env = worker_env(prefix, ENVSHIP_ZYGOTE_TEST="child")
    zygote_env = worker_env(prefix, ENVSHIP_ZYGOTE_ONLY="zygote")
    zygote = Zygote.start(prefix / "bin" / "python", zygote_env)
    assert zygote.refusal is None
    assert zygote.preloaded[0] == "distributed"

    async def main():
        async with Scheduler(
            host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
        ) as s:
            worker, report = await start_worker(zygote, env, s.address, "z", tmp_path)
            assert report["pid"] == worker.pid and worker.is_alive()
            # Its parent is the zygote; no setsid: the group is ours, as for
            # a plain start from this process.
            assert Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[
                1
            ].split()[1] == str(zygote.pid)
            assert os.getpgid(worker.pid) == os.getpgid(0)
            async with Client(s.address, asynchronous=True) as client:
                prefixes = await client.run(lambda: __import__("sys").prefix)
                assert prefixes == {report["address"]: str(prefix)}
                assert await client.submit(lambda x: x + 1, 1) == 2
                (environ,) = (
                    await client.run(lambda: dict(__import__("os").environ))
                ).values()
                assert environ["ENVSHIP_ZYGOTE_TEST"] == "child"
                assert "ENVSHIP_ZYGOTE_ONLY" not in environ
                assert environ["CONDA_PREFIX"] == str(prefix)
            await stop_worker(worker)
            assert worker.exitcode == 0
            assert zygote.exit_statuses[worker.pid] == 0

    asyncio.run(main())
    zygote.close(timeout=30)
    assert zygote._popen.returncode == 0


def test_temporary_folder_is_the_requests(env_prefix, tmp_path):
    # A preload that asked for the temporary folder under the zygote's TMPDIR.
    (tmp_path / "warm_tempdir.py").write_text(
        "import tempfile\nZYGOTE_TMP = tempfile.gettempdir()\n"
    )
    for name in ("zygote-tmp", "worker-tmp"):
        (tmp_path / name).mkdir()
    prefix = env_prefix("base")
    common = {"PYTHONPATH": str(tmp_path)}
    env = worker_env(prefix, TMPDIR=str(tmp_path / "worker-tmp"), **common)
    zygote_env = worker_env(prefix, TMPDIR=str(tmp_path / "zygote-tmp"), **common)
    zygote = Zygote.start(prefix / "bin" / "python", zygote_env, ["warm_tempdir"])
    assert zygote.preloaded == ["distributed", "warm_tempdir"]

    def folders():
        import tempfile

        import warm_tempdir

        return warm_tempdir.ZYGOTE_TMP, tempfile.gettempdir()

    async def main():
        async with Scheduler(
            host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
        ) as s:
            worker, _ = await start_worker(zygote, env, s.address, "tmp", tmp_path)
            async with Client(s.address, asynchronous=True) as client:
                (seen,) = (await client.run(folders)).values()
            assert list(seen) == [
                str(tmp_path / "zygote-tmp"),
                str(tmp_path / "worker-tmp"),
            ]
            await stop_worker(worker)

    asyncio.run(main())
    zygote.close(timeout=30)


def test_forked_children_have_their_own_random_state(env_prefix, tmp_path):
    # Seen from the workers: the zygote reseeds random and numpy.random after
    # the fork, and so do Python's own at-fork hook (random) and dask's
    # default_initializer (numpy), which worker.py runs; this proves the sum.
    prefix = env_prefix("sklearn-dev")
    env = worker_env(prefix)
    zygote = Zygote.start(
        prefix / "bin" / "python", env, preload=["numpy.random", "uuid"]
    )
    assert zygote.refusal is None
    assert zygote.preloaded == ["distributed", "numpy.random", "uuid"]

    def state():
        import random
        import tempfile
        import uuid

        import numpy

        return (
            random.random(),
            float(numpy.random.random()),
            uuid.uuid1().clock_seq,
            str(uuid.uuid4()),
            next(tempfile._get_candidate_names()),
        )

    async def main():
        async with Scheduler(
            host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
        ) as s:
            a, _ = await start_worker(zygote, env, s.address, "a", tmp_path)
            b, _ = await start_worker(zygote, env, s.address, "b", tmp_path)
            async with Client(s.address, asynchronous=True) as client:
                await client.wait_for_workers(2)
                first, second = (await client.run(state)).values()
            for one, other in zip(first, second, strict=True):
                assert one != other, (first, second)
            await stop_worker(a)
            await stop_worker(b)

    asyncio.run(main())
    zygote.close(timeout=30)


def test_child_has_only_the_passed_descriptors(env_prefix):
    prefix = env_prefix("base")
    env = worker_env(prefix)
    zygote = Zygote.start(prefix / "bin" / "python", env)
    pipes = [os.pipe() for _ in range(3)]
    control, stderr, report = pipes
    try:
        pid = zygote.fork(["3"], env, [control[0], 1, stderr[1], report[1]])
        # worker.main blocks reading its setup from the control pipe: then it
        # has 0-3 and its private copy of the control pipe (4), nothing else.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "pipe_read" in Path(f"/proc/{pid}/wchan").read_text():
                break
            time.sleep(0.05)
        fds = {
            int(fd): os.readlink(f"/proc/{pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{pid}/fd")
        }
        zygote_fds = os.listdir(f"/proc/{zygote.pid}/fd")
        assert len(zygote_fds) > 4, zygote_fds  # the socket, its wake-up pipe...
        assert sorted(fds) == [0, 1, 2, 3, 4], fds
        assert fds[0] == os.devnull  # worker.main took its control pipe off 0
        assert fds[4] == f"pipe:[{os.fstat(control[0]).st_ino}]"
        assert fds[2] == f"pipe:[{os.fstat(stderr[1]).st_ino}]"
        assert fds[3] == f"pipe:[{os.fstat(report[1]).st_ino}]"
        assert fds[1] == os.readlink("/proc/self/fd/1")
    finally:
        for fd in (fd for pair in pipes for fd in pair):
            os.close(fd)
    # End of file on its control pipe before any setup: it exits with 1.
    assert zygote.wait(pid, 60) == 1
    zygote.close(timeout=30)


def test_start_time_variable_that_differs_is_refused(env_prefix):
    prefix = env_prefix("base")
    env = worker_env(prefix)
    zygote = Zygote.start(prefix / "bin" / "python", env)
    try:
        # Read when the interpreter starts: a fork cannot change it.
        with pytest.raises(ForkRefused, match="PYTHONHASHSEED"):
            zygote.fork(["3"], {**env, "PYTHONHASHSEED": "17"}, [0, 1, 2])
        with pytest.raises(ForkRefused, match="OPENBLAS_NUM_THREADS"):
            zygote.fork(["3"], {**env, "OPENBLAS_NUM_THREADS": "4"}, [0, 1, 2])
    finally:
        zygote.close(timeout=30)
    assert zygote.exit_statuses == {}


def test_preload_that_starts_a_thread_makes_the_zygote_refuse(env_prefix, tmp_path):
    (tmp_path / "threaded_preload.py").write_text(
        textwrap.dedent(
            """
            import threading
            threading.Thread(
                target=threading.Event().wait, name="started-by-preload", daemon=True
            ).start()
            """
        )
    )
    prefix = env_prefix("base")
    env = worker_env(prefix, PYTHONPATH=str(tmp_path))
    zygote = Zygote.start(prefix / "bin" / "python", env, preload=["threaded_preload"])
    try:
        assert "threaded_preload" in zygote.preloaded
        assert zygote.refusal is not None and "started-by-preload" in zygote.refusal
        with pytest.raises(ForkRefused, match="2 threads.*started-by-preload"):
            zygote.fork(["3"], env, [0, 1, 2])
    finally:
        zygote.close(timeout=30)
    assert zygote.exit_statuses == {}


CLIENT = """
import asyncio, json, sys, time
from envship.node.zygote import ForkedWorker, Zygote

python, env, setup = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]

async def main():
    zygote = Zygote.start(python, env)
    worker = ForkedWorker(zygote, env)
    worker.start(bytes.fromhex(setup))
    report = json.loads(await worker.wait_report(60))
    print(json.dumps({"zygote": zygote.pid, "worker": worker.pid, **report}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_client_killed_ends_zygote_and_children(env_prefix, tmp_path):
    prefix = env_prefix("base")
    env = worker_env(prefix)

    async def main():
        async with Scheduler(
            host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
        ) as s:
            setup = setup_frame(s.address, "orphan", tmp_path / "orphan")
            client = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CLIENT,
                    str(prefix / "bin" / "python"),
                    json.dumps(env),
                    setup.hex(),
                ],
                stdout=subprocess.PIPE,
                cwd=ROOT,
            )
            try:
                line = await asyncio.to_thread(client.stdout.readline)
                started = json.loads(line)
                assert started["address"] in s.workers
                client.kill()
                client.wait()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not (
                    ended(started["worker"]) and ended(started["zygote"])
                ):
                    await asyncio.sleep(0.1)
                assert ended(started["worker"]), "the forked worker outlived its client"
                assert ended(started["zygote"]), "the zygote outlived its client"
                while started["address"] in s.workers and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert started["address"] not in s.workers
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()

    asyncio.run(main())


def test_worker_outlives_a_killed_zygote_and_is_still_watched(env_prefix, tmp_path):
    prefix = env_prefix("base")
    env = worker_env(prefix)
    zygote = Zygote.start(prefix / "bin" / "python", env)
    exits: list[int | None] = []

    async def main():
        async with Scheduler(
            host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
        ) as s:
            worker = ForkedWorker(zygote, env)
            worker.set_exit_callback(lambda p: exits.append(p.exitcode))
            worker.start(setup_frame(s.address, "w", tmp_path / "w"))
            report = json.loads(await worker.wait_report(60))
            zygote.kill()
            # The worker is not the zygote's to take along: it keeps serving.
            async with Client(s.address, asynchronous=True) as client:
                assert await client.submit(lambda x: x * 2, 21) == 42
            assert worker.is_alive() and report["address"] in s.workers
            # Its exit is seen through the pidfd; the code is unknown then.
            await worker.kill()
            await worker.join(30)
            assert worker.exitcode == UNKNOWN_EXIT
            assert exits == [UNKNOWN_EXIT]
            worker.close()

    asyncio.run(main())
    with pytest.raises(ZygoteError, match="is gone"):
        zygote.fork(["3"], env, [0, 1, 2])


def test_terminate_reports_the_signal(env_prefix, tmp_path):
    prefix = env_prefix("base")
    env = worker_env(prefix)
    zygote = Zygote.start(prefix / "bin" / "python", env)

    async def main():
        async with Scheduler(
            host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
        ) as s:
            worker, _ = await start_worker(zygote, env, s.address, "t", tmp_path)
            await worker.kill()
            await worker.join(30)
            assert worker.exitcode == -signal.SIGKILL
            assert not worker.is_alive()
            worker.close()

    asyncio.run(main())
    zygote.close(timeout=30)
    assert zygote._popen.returncode == 0
