"""A zygote shared by the nannies of a node: ``envship.node.zygotes``'s
start-or-join through the socket in a cache's ``zygotes/`` folder, and
``bootstrap/zygote.py`` serving several clients. Real zygotes under the
"base" fixture; no nanny (the cluster case is in tests/test_zygote_nanny.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from envship.node import zygotes
from envship.node.worker_environ import TargetEnvironment, child_environ

pytestmark = pytest.mark.timeout(120)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} stayed"
        time.sleep(0.05)


def fork_failing_child(zygote) -> int:
    """A child whose control pipe is closed at once: it exits by itself."""
    control_r, control_w = os.pipe()
    report_r, report_w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.close(control_w)
    try:
        return zygote.fork(
            ["3"], zygote.environ, [control_r, devnull, devnull, report_w]
        )
    finally:
        for fd in (control_r, devnull, report_r, report_w):
            os.close(fd)


@pytest.fixture
def target(env_prefix, tmp_path) -> TargetEnvironment:
    # A long folder on purpose: the socket's path is longer than 108 bytes.
    folder = tmp_path / ("a-long-folder-name-" * 5) / "zygotes"
    folder.parent.mkdir()
    return TargetEnvironment("base", Path(env_prefix("base")), "conda", "base", folder)


def test_a_second_process_joins_the_zygote_and_hears_only_its_children(target):
    environ = child_environ(target, os.environ, {"OPENBLAS_NUM_THREADS": "1"})
    starter = zygotes._start_or_join(target, environ, timeout=60)
    joiner = zygotes._start_or_join(target, environ, timeout=60)
    try:
        assert not starter.shared and joiner.shared
        assert joiner.pid == starter.pid
        assert oct(target.zygotes.stat().st_mode & 0o777) == "0o700"
        for z in (starter, joiner):
            z.environ = environ
        mine = fork_failing_child(joiner)
        assert joiner.wait(mine, 30) is not None
        assert mine not in starter.exit_statuses
        theirs = fork_failing_child(starter)
        assert starter.wait(theirs, 30) is not None
        assert theirs not in joiner.exit_statuses

        # The starter leaves: the zygote serves the other one still.
        starter.close()
        again = fork_failing_child(joiner)
        assert joiner.wait(again, 30) is not None
    finally:
        starter.close()
        joiner.close()
    # Its last client left: it exits, and the next one starts a new zygote.
    wait_gone(starter.pid)
    fresh = zygotes._start_or_join(target, environ, timeout=60)
    try:
        assert not fresh.shared and fresh.pid != starter.pid
    finally:
        fresh.close(timeout=30)
    wait_gone(fresh.pid)


def test_other_start_time_variables_get_a_zygote_of_their_own(target):
    one = child_environ(target, os.environ, {"OPENBLAS_NUM_THREADS": "1"})
    two = {**one, "OMP_NUM_THREADS": "3"}
    first = zygotes._start_or_join(target, one, timeout=60)
    second = zygotes._start_or_join(target, two, timeout=60)
    try:
        assert not first.shared and not second.shared
        assert first.pid != second.pid
    finally:
        for z in (first, second):
            z.close(timeout=30)


def test_a_zygote_whose_environment_left_the_node_is_closed(env_prefix, tmp_path):
    # Another nanny of the node evicted it: only its files are gone here.
    prefix = tmp_path / "env"
    prefix.symlink_to(env_prefix("base"))
    target = TargetEnvironment("base", prefix, "conda", "base")
    environ = child_environ(target, os.environ, {"OPENBLAS_NUM_THREADS": "1"})
    zygote = zygotes.get(target, environ, timeout=60)
    try:
        zygotes.running("tcp://127.0.0.1:1", None)
        assert list(zygotes.zygotes().values()) == [zygote]  # kept: keep is 2
        prefix.unlink()
        zygotes.trim()
        assert zygotes.zygotes() == {}
        wait_gone(zygote.pid)
    finally:
        zygotes.release("tcp://127.0.0.1:1")


def test_a_client_that_sends_junk_is_dropped_and_the_zygote_serves_on(target):
    environ = child_environ(target, os.environ, {"OPENBLAS_NUM_THREADS": "1"})
    starter = zygotes._start_or_join(target, environ, timeout=60)
    liar = zygotes._start_or_join(target, environ, timeout=60)
    try:
        assert liar.shared
        liar._send_frame({"op": "fork", "id": "x", "args": [1], "env": None})
        deadline = time.monotonic() + 30
        while liar.is_alive():  # the zygote closed its connection
            assert time.monotonic() < deadline, "the junk was not refused"
            time.sleep(0.05)
        starter.environ = environ
        child = fork_failing_child(starter)
        assert starter.wait(child, 30) is not None
    finally:
        liar.close()
        starter.close(timeout=30)
    wait_gone(starter.pid)
