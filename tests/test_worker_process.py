"""Tests for envship.node.worker_process on a real cluster bound to 127.0.0.1.

The environments are the real prefixes of ``fixtures`` (conda envs made from
pyenv CPythons): "base" has the nanny's distributed, "no-distributed" lacks
it, "py312" runs another Python version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import distributed.nanny
import distributed.process
import psutil
import pytest
from distributed import Client, Nanny, Scheduler
from distributed.core import Status

from envship.node import worker_environ, worker_process
from envship.node.worker_environ import TargetEnvironment, child_environ
from envship.node.worker_process import EnvWorkerProcess, switch
from envship.node.worker_subprocess import WorkerSubprocess
from fixtures.cluster import wait_until_async

pytestmark = pytest.mark.timeout(300)

TIMINGS: dict[str, list[float]] = {}
WorkerProcess = distributed.nanny.WorkerProcess


def _record(what: str, seconds: float) -> None:
    TIMINGS.setdefault(what, []).append(seconds)


@pytest.fixture(scope="module", autouse=True)
def report_timings(request):
    yield
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is None or not TIMINGS:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        for what, values in TIMINGS.items():
            shown = ", ".join(f"{v:.2f}" for v in values)
            reporter.write_line(f"envship timing: {what}: {shown} s")


@pytest.fixture(autouse=True)
def restore_worker_process(monkeypatch):
    # install() replaces distributed.nanny.WorkerProcess; keep tests independent.
    monkeypatch.setattr(distributed.nanny, "WorkerProcess", WorkerProcess)


@pytest.fixture(scope="session")
def env_target(env_prefix) -> TargetEnvironment:
    """A conda env with the nanny's distributed, at another prefix."""
    return TargetEnvironment("base", env_prefix("base"), "conda", "base")


@pytest.fixture(scope="session")
def broken_target(env_prefix) -> TargetEnvironment:
    """A real python prefix that cannot import distributed."""
    prefix = env_prefix("no-distributed")
    return TargetEnvironment("no-distributed", prefix, "conda", "no-distributed")


@pytest.fixture(scope="session")
def py312_target(env_prefix) -> TargetEnvironment:
    """Python 3.12 with the nanny's distributed, under the nanny's 3.11."""
    return TargetEnvironment("py312", env_prefix("py312"), "conda", "py312")


@contextlib.asynccontextmanager
async def cluster(n: int = 2, **nanny_kwargs):
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        nannies = [
            Nanny(
                scheduler.address,
                host="127.0.0.1",
                name=f"n{i}",
                nthreads=1,
                **nanny_kwargs,
            )
            for i in range(n)
        ]
        try:
            await asyncio.gather(*nannies)
            async with Client(scheduler.address, asynchronous=True) as client:
                yield scheduler, nannies, client
        finally:
            await asyncio.gather(*(nanny.close() for nanny in nannies))


def _describer():
    # Defined inside a function so that cloudpickle sends it by value: the
    # environment's worker cannot import this test module.
    def describe():
        import os
        import sys

        return {
            "prefix": sys.prefix,
            "executable": sys.executable,
            "pid": os.getpid(),
            "hashseed": os.environ.get("PYTHONHASHSEED"),
            "hash": hash("envship"),
            "path0": os.environ["PATH"].split(os.pathsep)[0],
            "virtual_env": os.environ.get("VIRTUAL_ENV"),
            "conda_prefix": os.environ.get("CONDA_PREFIX"),
            "pythonpath": os.environ.get("PYTHONPATH"),
        }

    return describe


async def describe(client: Client, nanny: Nanny) -> dict:
    address = nanny.worker_address
    result = await client.run(_describer(), workers=[address])
    return result[address]


def same_path(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def assert_in_env(info: dict, target: TargetEnvironment) -> None:
    assert same_path(info["prefix"], target.prefix), info
    assert same_path(info["path0"], target.prefix / "bin"), info
    assert info["hashseed"] == "6640", info
    assert info["pythonpath"] is None, info
    if target.kind == "venv":
        assert info["virtual_env"] == str(target.prefix)
    else:
        assert info["conda_prefix"] == str(target.prefix)


def assert_in_nanny_python(info: dict) -> None:
    assert same_path(info["prefix"], sys.prefix), info


def assert_registered(scheduler: Scheduler, nanny: Nanny, name: str) -> None:
    ws = scheduler.workers[nanny.worker_address]
    assert ws.name == name
    assert ws.nanny == nanny.address


async def wait_for_new_worker(nanny: Nanny, old_address: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        process = nanny.process
        if (
            process is not None
            and process.status == Status.running
            and nanny.worker_address not in (None, old_address)
        ):
            return nanny.worker_address
        assert time.monotonic() < deadline, "the worker did not come back"
        await asyncio.sleep(0.02)


async def restart_worker(client: Client, nanny: Nanny) -> str:
    """``restart_workers`` for one nanny's worker, then wait for its successor.

    ``Scheduler.restart_workers`` may return while the old worker's record is
    still there and before the nanny has started the new process.
    """
    old = nanny.worker_address
    await client.restart_workers([old])
    return await wait_for_new_worker(nanny, old)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_pid_gone(pid: int, timeout: float) -> float:
    started = time.monotonic()
    while not pid_gone(pid):
        assert time.monotonic() - started < timeout, f"process {pid} still runs"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_bootstrap_script_is_found():
    script = worker_environ.bootstrap_script()
    assert script.is_file()
    assert script.name == "worker.py"
    assert script.parent.name == "bootstrap"


def test_child_environ_keeps_the_environment_apart(tmp_path):
    target = TargetEnvironment("x", tmp_path / "env", "conda", "x")
    nanny_lib = str(Path(sys.prefix) / "lib")
    base = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": "/somewhere",
        "PYTHONHOME": "/home",
        "PYTHONSTARTUP": "s.py",
        "PYTHONUSERBASE": "/u",
        "PYTHONEXECUTABLE": "/p",
        "VIRTUAL_ENV": sys.prefix,
        "CONDA_PREFIX": "/old",
        "CONDA_DEFAULT_ENV": "old",
        "_CONDA_ROOT": "/opt/conda",
        "_CONDA_EXE": "/opt/conda/bin/conda",
        "_CE_CONDA": "",
        "PYTHONHASHSEED": "6640",
        "LD_LIBRARY_PATH": f"{nanny_lib}:/opt/lib:{tmp_path / 'env' / 'lib'}",
        "OMP_NUM_THREADS": "1",
        # Meant for the nanny's interpreter, not for another environment's.
        "PYTHONWARNINGS": "error",
        "PYTHONPYCACHEPREFIX": "/tmp/nanny-pycache",
        "PYTHONSAFEPATH": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    explicit = {"PYTHONWARNINGS": "ignore", "PYTHONPATH": "/nanny/site", "X": "y"}
    env = child_environ(target, base, explicit)
    assert env["PATH"] == f"{tmp_path / 'env' / 'bin'}:/usr/bin:/bin"
    assert env["CONDA_PREFIX"] == str(tmp_path / "env")
    assert env["PYTHONHASHSEED"] == "6640"
    assert env["OMP_NUM_THREADS"] == "1"
    # Set for the workers on purpose: passed on, unless it steers python back.
    assert env["PYTHONWARNINGS"] == "ignore" and env["X"] == "y"
    for leaked in ("PYTHONPYCACHEPREFIX", "PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE"):
        assert leaked not in env
    assert env["LD_LIBRARY_PATH"] == f"/opt/lib:{tmp_path / 'env' / 'lib'}"
    conda = ("CONDA_DEFAULT_ENV", "_CONDA_ROOT", "_CONDA_EXE", "_CE_CONDA")
    for gone in worker_environ.DROPPED_VARIABLES + conda:
        assert gone not in env

    venv = TargetEnvironment("y", tmp_path / "venv", "venv", "y")
    env = child_environ(venv, {"PATH": "", "LD_LIBRARY_PATH": nanny_lib})
    assert env["PATH"] == str(tmp_path / "venv" / "bin")
    assert env["VIRTUAL_ENV"] == str(tmp_path / "venv")
    assert "LD_LIBRARY_PATH" not in env


def test_install_converts_the_nannys_process_once():
    async def main():
        async with cluster(n=1) as (_, [nanny], _client):
            process = nanny.process
            assert type(process) is WorkerProcess
            assert worker_process.install(nanny) is process
            assert type(process) is EnvWorkerProcess
            assert process.target is None and process.last_error is None
            assert worker_process.install(nanny) is process
            assert distributed.nanny.WorkerProcess is EnvWorkerProcess
            # With no target it is the stock worker, through a restart too.
            assert await nanny.restart() == "OK"
            assert nanny.process is process
            assert isinstance(process.process, distributed.process.AsyncProcess)

    asyncio.run(main())


def test_switch_into_environment_and_back(env_target):
    async def main():
        async with cluster() as (scheduler, [a, b], client):
            b_before = await describe(client, b)
            r = await switch(a, env_target)
            assert r["ok"], r["error"]
            assert r["target"] == env_target.id and r["error"] is None
            assert r["worker_address"] == a.worker_address
            assert same_path(Path(r["python"]).parent, env_target.prefix / "bin")
            _record("switch to env", r["seconds"])
            assert isinstance(a.process.process, WorkerSubprocess)

            info = await describe(client, a)
            assert_in_env(info, env_target)
            assert_registered(scheduler, a, "n0")
            # Same PYTHONHASHSEED, hence the same hashes as the nanny's workers.
            assert info["hash"] == b_before["hash"]

            # The other nanny of the process is untouched.
            assert await describe(client, b) == b_before
            assert_in_nanny_python(b_before)

            def inc(x):
                return x + 1

            future = client.submit(inc, 1, workers=[a.worker_address])
            assert await future == 2

            r = await switch(a, None)
            assert r["ok"], r["error"]
            assert r["target"] is None
            assert same_path(r["python"], sys.executable)
            _record("switch back", r["seconds"])
            assert_in_nanny_python(await describe(client, a))
            assert_registered(scheduler, a, "n0")
            assert pid_gone(info["pid"])
            assert a.status == Status.running

    asyncio.run(main())


def test_environment_persists_through_restart_and_crash(env_target):
    async def main():
        async with cluster() as (scheduler, [a, _b], client):
            r = await switch(a, env_target)
            assert r["ok"], r["error"]

            started = time.perf_counter()
            await restart_worker(client, a)
            _record("restart_workers in env", time.perf_counter() - started)
            info = await describe(client, a)
            assert_in_env(info, env_target)
            assert_registered(scheduler, a, "n0")

            old = a.worker_address
            started = time.perf_counter()
            os.kill(info["pid"], signal.SIGKILL)
            await wait_for_new_worker(a, old)
            _record("crash recovery in env", time.perf_counter() - started)
            info = await describe(client, a)
            assert_in_env(info, env_target)
            assert_registered(scheduler, a, "n0")
            assert a.status == Status.running
            last_pid = info["pid"]

        # Closing the nanny stops its environment's worker.
        assert pid_gone(last_pid)

    asyncio.run(main())


def test_memory_monitor_restarts_worker_in_environment(env_target):
    def allocate():
        import time

        data = b"x" * (600 * 2**20)
        time.sleep(60)
        return len(data)

    async def main():
        config = {
            "distributed.worker.memory.monitor-interval": "50ms",
            "distributed.worker.memory.terminate": 0.95,
        }
        with dask.config.set(config):
            async with cluster(n=1, memory_limit="500 MiB") as (_, [a], client):
                r = await switch(a, env_target)
                assert r["ok"], r["error"]
                old = a.worker_address
                hog = asyncio.create_task(client.run(allocate, workers=[old]))
                started = time.perf_counter()
                await wait_for_new_worker(a, old)
                _record("memory monitor restart in env", time.perf_counter() - started)
                hog.cancel()
                with contextlib.suppress(BaseException):
                    await hog
                assert_in_env(await describe(client, a), env_target)
                events = await client.get_events("worker-restart-memory")
                assert [e["worker"] for _, e in events] == [old]

    asyncio.run(main())


def test_broken_environment_falls_back_to_nanny_python(broken_target, tmp_path):
    async def main():
        async with cluster() as (scheduler, [a, b], client):
            r = await switch(a, broken_target)
            assert not r["ok"]
            assert r["target"] is None
            assert "No module named 'distributed'" in r["error"]
            assert broken_target.name in r["error"]
            assert "install distributed" in r["error"]
            assert "Exit code: 1." in r["error"]
            assert same_path(r["python"], sys.executable)
            _record("failed switch with fallback", r["seconds"])
            assert a.process.target is None
            assert a.process.last_error == r["error"]
            assert a.status == Status.running and b.status == Status.running
            assert_in_nanny_python(await describe(client, a))
            assert_registered(scheduler, a, "n0")

            # The fallback is the stock worker: it restarts as such after a crash.
            old = a.worker_address
            os.kill(a.process.pid, signal.SIGKILL)
            await wait_for_new_worker(a, old)
            assert_in_nanny_python(await describe(client, a))

            missing = TargetEnvironment("gone", tmp_path / "nothing", "conda", "gone")
            r = await switch(a, missing)
            assert not r["ok"]
            assert "missing or not executable" in r["error"]
            assert_in_nanny_python(await describe(client, a))

            r = await switch(a, None)
            assert r["ok"] and a.process.last_error is None
            assert a.status == Status.running

    asyncio.run(main())


NANNY_SCRIPT = """
import asyncio, sys
from pathlib import Path
from distributed import Nanny
from envship.node.worker_environ import TargetEnvironment
from envship.node.worker_process import switch

async def main():
    scheduler, id, prefix, kind, name = sys.argv[1:6]
    async with Nanny(scheduler, host="127.0.0.1", nthreads=1, name="orphan") as nanny:
        r = await switch(nanny, TargetEnvironment(id, Path(prefix), kind, name))
        assert r["ok"], r["error"]
        print(nanny.process.process.pid, flush=True)
        await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_worker_closes_when_its_nanny_dies(env_target, tmp_path):
    script = tmp_path / "nanny.py"
    script.write_text(NANNY_SCRIPT)
    t = env_target

    async def main():
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
            args = [sys.executable, str(script), scheduler.address]
            args += [t.id, str(t.prefix), t.kind, t.name]
            nanny = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
            try:
                line = await asyncio.to_thread(nanny.stdout.readline)
                assert line.strip().isdigit(), "the nanny did not start its worker"
                worker_pid = int(line)
                assert not pid_gone(worker_pid)
                assert [ws.name for ws in scheduler.workers.values()] == ["orphan"]
                nanny.send_signal(signal.SIGKILL)
                await asyncio.to_thread(nanny.wait, 10)
                seconds = await wait_pid_gone(worker_pid, timeout=30)
                _record("worker exit after nanny SIGKILL", seconds)
                # It closed and said so, rather than being dropped on timeout.
                await wait_until_async(lambda: not scheduler.workers, timeout=5)
            finally:
                if nanny.poll() is None:
                    nanny.kill()
                    nanny.wait(10)
                nanny.stdout.close()

    asyncio.run(main())


def fake_environment(root: Path, name: str, python_script: str) -> TargetEnvironment:
    """A prefix whose bin/python is a shell script, to fail in chosen ways."""
    python = root / name / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n" + python_script)
    python.chmod(0o755)
    return TargetEnvironment(name, root / name, "venv", name)


def test_environment_python_that_crashes_or_hangs_falls_back(tmp_path):
    crashing = fake_environment(
        tmp_path, "crashing", "echo 'boom: libpython is gone' >&2\nexit 3\n"
    )
    hanging = fake_environment(tmp_path, "hanging", "exec sleep 600\n")

    async def main():
        async with cluster(n=1) as (scheduler, [a], client):
            r = await switch(a, crashing)
            assert not r["ok"]
            assert "exited before reporting a worker address" in r["error"]
            assert "Exit code: 3" in r["error"]
            assert "boom: libpython is gone" in r["error"]
            assert_in_nanny_python(await describe(client, a))

            a.process.start_timeout = 1
            r = await switch(a, hanging)
            assert not r["ok"]
            assert "no worker address reported within 1 s" in r["error"]
            assert "Exit code: -9" in r["error"]
            assert_in_nanny_python(await describe(client, a))
            assert_registered(scheduler, a, "n0")
            assert a.status == Status.running

    asyncio.run(main())


def test_worker_runs_under_another_python_version(py312_target):
    target = py312_target

    async def main():
        async with cluster(n=1) as (scheduler, [a], client):
            r = await switch(a, target)
            assert r["ok"], r["error"]
            _record("switch to python 3.12 env", r["seconds"])
            # Functions sent by reference only: bytecode differs across versions.
            address = a.worker_address
            versions = await client.run(platform.python_version, workers=[address])
            assert versions == {address: "3.12.1"}
            prefix = await client.run(os.getenv, "CONDA_PREFIX", workers=[address])
            assert prefix == {address: str(target.prefix)}
            assert await client.submit(sum, [1, 2], workers=[address]) == 3
            address = await restart_worker(client, a)
            versions = await client.run(platform.python_version, workers=[address])
            assert versions == {address: "3.12.1"}
            assert_registered(scheduler, a, "n0")

    asyncio.run(main())
