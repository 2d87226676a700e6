"""`envship use`, `status` and `cache gc --scheduler` given a scheduler they cannot use.

Each bad address ends in one `error:` line naming the address and a `Fix:`
line, no traceback, within dask's `distributed.comm.timeouts.connect`. The
matrix runs the real CLI in this process (its imports once, seconds in all);
two cases run it as a user does, in a process of its own, with the timeout
set in the environment as a user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import dask.config
import pytest
from click.testing import CliRunner

from envship.cli import main
from fixtures.cluster import local_cluster

COMMANDS = {
    "use": ["use", "base", "--scheduler"],
    "status": ["status", "--scheduler"],
    "cache gc": ["cache", "gc", "--scheduler"],
}


@pytest.fixture
def unanswered() -> Iterator[str]:
    """An address whose connections are never answered, as an unroutable host's.

    A listener with a full accept queue: the kernel drops new SYNs, so a
    connect hangs until the client gives up (10.255.255.1 does that on a
    real network; here it may reach a proxy).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    try:
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for s in [*fillers, listener]:
            s.close()


@pytest.fixture
def silent() -> Iterator[str]:
    """An address that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def closed_port() -> str:
    """An address on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


#: kind -> (address, or the name of a fixture giving it; words the error says)
BAD = {
    "refused": (closed_port, ["connection refused"]),
    "port not a number": (lambda: "127.0.0.1:8799x", ["port '8799x' is not a number"]),
    "port out of range": (lambda: "tcp://127.0.0.1:99999", ["between 1 and 65535"]),
    "no port": (lambda: "127.0.0.1", ["no port"]),
    "unknown protocol": (lambda: "nonsense://x", ["unknown protocol 'nonsense'"]),
    "web address": (lambda: "http://127.0.0.1:8787", ["dashboard"]),
    "no such host": (
        lambda: "tcp://no-such-host.invalid:8786",
        ["'no-such-host.invalid' does not resolve"],
    ),
    "unanswered": ("unanswered", ["no answer within 1 s", "timeouts.connect"]),
    "silent": ("silent", ["did not answer as a Dask scheduler within 1 s"]),
}


def check_one_error(output: str, address: str, words: list[str]) -> None:
    lines = output.strip().splitlines()
    assert "Traceback" not in output, output
    assert 1 < len(lines) <= 3, output
    assert lines[0].startswith("error: scheduler ") and repr(address) in lines[0]
    assert any(line.startswith("Fix: ") for line in lines), output
    for word in words:
        assert word in output, output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", BAD)
def test_a_bad_address_is_one_error_with_its_fix(command, kind, request):
    make, words = BAD[kind]
    address = request.getfixturevalue(make) if isinstance(make, str) else make()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(main, [*COMMANDS[command], address])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    check_one_error(result.output, address, words)


def envship_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "envship.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_refused_ends_within_the_configured_timeout_not_30_s():
    """Dask retries a refused connection until its connect timeout, then envship says so."""
    address = closed_port()
    result = envship_cli(
        "status",
        DASK_SCHEDULER_ADDRESS=address,
        DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s",
    )
    assert result.returncode == 1
    assert result.stdout == ""
    check_one_error(result.stderr, address, ["connection refused"])
    assert "DASK_SCHEDULER_ADDRESS" in result.stderr  # where the address came from


def test_unanswered_names_the_timeout(unanswered):
    result = envship_cli(
        "use",
        "base",
        "--scheduler",
        unanswered,
        DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="1s",
    )
    assert result.returncode == 1
    check_one_error(
        result.stderr, unanswered, ["no answer within 1 s", "DASK_DISTRIBUTED__COMM"]
    )


def test_a_good_address_works_and_a_workers_is_refused(tmp_path):
    with local_cluster(tmp_path, {"node": 1}) as cluster:
        for command, says in [("status", "node-0"), ("cache gc", "evicted 0")]:
            result = envship_cli(*COMMANDS[command], cluster.address)
            assert result.returncode == 0, result.stderr
            assert says in result.stdout
        info = cluster.client.scheduler_info()["workers"]
        worker = next(iter(info))
        nanny = info[worker]["nanny"]
        for address, kind in [(worker, "worker"), (nanny, "nanny")]:
            result = CliRunner().invoke(main, ["status", "--scheduler", address])
            assert result.exit_code == 1
            check_one_error(result.output, address, [f"a Dask {kind} listens there"])
