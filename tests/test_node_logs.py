"""What envship writes to a nanny's log, and what a switch writes to the user's terminal.

A nanny's log (``dask worker --preload-nanny envship``, dask's default
logging) says what envship does: the cache, the transfer, the unpack, the
restart. The restarts envship asks for are INFO, not distributed's WARNING
of a crash; a worker that really dies still warns.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

import dask
import pytest
from distributed import Client, LocalCluster

import envship
from envship.node.logs import AsDistributed, EnvshipRestarts
from fixtures.cluster import local_cluster, wait_until

pytestmark = pytest.mark.timeout(300)


def lines(log, start: int = 0) -> list[str]:
    return log.read_text().splitlines()[start:]


def test_a_nannys_log_says_what_envship_does(tmp_path, env_prefix, store):
    artifact = envship.pack(env_prefix("venv"), name="tools", store=store)
    short = artifact.id[:12]
    with local_cluster(tmp_path / "c", {"a": 1, "b": 1}) as cluster:
        client = cluster.client
        assert client.use_environment(artifact).ok
        logs = {node: tmp_path / "c" / f"{node}-0.log" for node in ("a", "b")}
        for node, log in logs.items():
            text = "\n".join(lines(log))
            # Every line of envship at INFO, in distributed's format.
            assert re.search(
                r" - envship - INFO - envship: nanny \S+ uses cache ", text
            )
            assert re.search(
                rf"envship.transfer - INFO - envship: receiving tools \({short}\): "
                r"[\d.]+ [kMG]iB in \d+ pieces",
                text,
            ), text
            assert re.search(
                rf"envship: tools \({short}\) arrived: [\d.]+ [kMG]iB in [\d.]+ s "
                r"\([\d.]+ [kMG]iB/s\), from \S+ [\d.]+ [kMG]iB",
                text,
            ), text
            assert re.search(
                rf"envship.cache - INFO - unpacking tools \({short}\) from its "
                r"archive \([\d.]+ [kMG]iB\)",
                text,
            ), text
            assert re.search(
                rf"unpacked tools \({short}\) in [\d.]+ s: \d+ files", text
            )
            assert f"envship: restarting worker {node}-0 into tools ({short})" in text
            assert re.search(
                rf"envship: worker {node}-0 runs in tools \({short}\), at tcp://"
                r"127.0.0.1:\d+ \(restart took [\d.]+ s\)",
                text,
            ), text
            # The restart envship asked for is no crash.
            assert "distributed.nanny - INFO - Restarting worker" in text
            assert "WARNING" not in text, text

        # Back, and there again: the cache holds it.
        marks = {node: len(lines(log)) for node, log in logs.items()}
        assert client.use_environment(None).ok
        assert client.use_environment(artifact).ok
        for node, log in logs.items():
            again = "\n".join(lines(log, marks[node]))
            assert "envship: restarting worker" in again
            assert (
                f"envship: restarting worker {node}-0 into the nanny's own Python"
                in (again)
            )
            assert (
                f"envship: tools ({short}) for {node}-0: unpacked in this node's "
                "cache already"
            ) in again
            assert "receiving" not in again and "unpacking" not in again
            assert "WARNING" not in again, again

        # A worker that dies is a crash, and distributed says so as ever.
        mark = len(lines(logs["a"]))
        pids = client.run(lambda: __import__("os").getpid())
        names = {
            a: w["name"]
            for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
        }
        (victim,) = [pid for a, pid in pids.items() if names[a] == "a-0"]
        os.kill(victim, signal.SIGKILL)

        def warned() -> bool:
            return any(
                "distributed.nanny - WARNING - Restarting worker" in line
                for line in lines(logs["a"], mark)
            )

        wait_until(warned)
        client.wait_for_workers(2)


def test_a_local_cluster_shows_no_warning_for_a_switch(env_prefix, store, tmp_path):
    """The notebook case: nannies in the user's process, distributed silenced
    below WARNING (LocalCluster's default): a switch shows nothing."""
    artifact = envship.pack(env_prefix("venv"), name="tools", store=store)
    shown: list[logging.LogRecord] = []

    class Shown(logging.StreamHandler):
        """Shows what distributed's own stderr handler shows, silenced as it is."""

        def emit(self, record):
            shown.append(record)

    distributed_log = logging.getLogger("distributed")
    envship_log = logging.getLogger("envship")
    nanny_log = logging.getLogger("distributed.nanny")
    saved = envship_log.level, envship_log.propagate, list(envship_log.handlers)
    handler = Shown()
    distributed_log.addHandler(handler)
    try:
        with (
            dask.config.set({"envship.cache.directory": str(tmp_path / "cache")}),
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                preload_nanny=["envship"],
            ) as cluster,
            Client(cluster) as client,
        ):
            assert client.use_environment(artifact).ok
            assert client.use_environment(None).ok
            # distributed's handler (stderr) is the one envship's lines reach too.
            assert any(isinstance(h, AsDistributed) for h in envship_log.handlers)
            assert any(isinstance(f, EnvshipRestarts) for f in nanny_log.filters)
    finally:
        distributed_log.removeHandler(handler)
        for h in envship_log.handlers:
            if h not in saved[2]:
                envship_log.removeHandler(h)
        envship_log.setLevel(saved[0])
        envship_log.propagate = saved[1]
    # Nothing: the restarts are INFO, below LocalCluster's WARNING, and so
    # are envship's lines.
    assert [f"{r.name}: {r.getMessage()}" for r in shown] == []


def test_the_filter_lowers_only_envship_restarts():
    from envship.node.logs import envship_restart

    record = logging.LogRecord(
        "distributed.nanny",
        logging.WARNING,
        __file__,
        1,
        "Restarting worker (status=%s)",
        ("Status.running",),
        None,
    )
    other = logging.LogRecord(
        "distributed.nanny", logging.WARNING, __file__, 1, "something else", (), None
    )
    f = EnvshipRestarts()
    assert f.filter(record) and record.levelno == logging.WARNING  # a crash
    token = envship_restart.set("tools (6f1c)")
    try:
        kept = f.filter(record)
        assert record.levelname == "INFO"
        assert kept == logging.getLogger("distributed.nanny").isEnabledFor(logging.INFO)
        assert f.filter(other) and other.levelno == logging.WARNING
    finally:
        envship_restart.reset(token)
    assert sys.modules["envship.node.logs"].envship_restart.get() is None
