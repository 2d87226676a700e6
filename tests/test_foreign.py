"""Calls into environments whose Python cannot host a worker (Python 2.7,
another Python 3), from tasks, on a real cluster: the bridge of each worker
started on first use, errors with their traceback, crashes, modules sent with
``upload_file``, workers switched elsewhere meanwhile, nodes that join later."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

import envship
from envship import ForeignEnvironment
from fixtures.cluster import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("cluster"), {"node-a": 2}) as c:
        yield c


@pytest.fixture(scope="module")
def py27(cluster, env_prefix):
    return cluster.client.use_environment(env_prefix("py27"))


def workers(client) -> set[str]:
    return set(client.scheduler_info(n_workers=-1)["workers"])


def run(client, env: ForeignEnvironment, target: str, *args, **kwargs):
    return client.submit(env.call, target, *args, pure=False, **kwargs).result()


def test_a_python_2_environment_is_installed_and_nobody_restarts(cluster, env_prefix):
    client = cluster.client
    before = workers(client)
    py27 = client.use_environment(env_prefix("py27"))
    assert isinstance(py27, ForeignEnvironment) and py27.python == "2.7.18"
    assert workers(client) == before
    for cache in cluster.caches.values():
        assert (cache / py27.id / "bin" / "python2.7").exists()
    assert run(client, py27, "platform.python_version") == "2.7.18"
    assert run(client, py27, "sys:prefix.__str__") == str(
        cluster.caches["node-a"] / py27.id
    )
    # Text, numbers, containers, bytes: both ways.
    assert run(client, py27, "json.loads", '{"a": [1, 2.5, null, true]}') == {
        "a": [1, 2.5, None, True]
    }
    assert run(client, py27, "binascii:hexlify", bytearray(b"\0\xff")) == "00ff"


def test_an_exception_arrives_with_its_traceback(cluster, py27):
    with pytest.raises(ValueError, match="math domain error") as info:
        run(cluster.client, py27, "math.sqrt", -1.0)
    assert "under Python 2.7.18" in str(info.value)
    assert "Traceback (most recent call last)" in str(info.value)
    with pytest.raises(ImportError, match="No module named nothing_here"):
        run(cluster.client, py27, "nothing_here.f")
    with pytest.raises(TypeError, match="cannot cross into"):
        run(cluster.client, py27, "json.dumps", lambda: 1)


def test_a_killed_bridge_fails_its_task_and_the_next_call_starts_a_fresh_one(
    cluster, py27
):
    client = cluster.client
    worker = sorted(workers(client))[0]

    def on(target, *args):
        return client.submit(
            py27.call, target, *args, workers=[worker], pure=False
        ).result()

    first = on("os.getpid")
    with pytest.raises(RuntimeError, match=r"died \(exit code 3\)"):
        on("os._exit", 3)
    second = on("os.getpid")
    assert second != first and on("platform.python_version") == "2.7.18"


def test_modules_sent_with_upload_file(cluster, py27, tmp_path):
    module = tmp_path / "legacy_upload.py"
    module.write_text("def greet(name):\n    return u'hello %s from python 2' % name\n")
    client = cluster.client
    client.upload_file(str(module))
    assert run(client, py27, "legacy_upload.greet", "ada") == "hello ada from python 2"


def test_another_python_3_and_workers_switched_elsewhere(
    cluster, py27, env_prefix, store
):
    client = cluster.client
    py312 = envship.foreign(client, env_prefix("py312"))
    assert run(client, py312, "platform.python_version") == "3.12.1"
    # Workers switched into another environment still call into both.
    assert client.use_environment(envship.pack(env_prefix("base"))).ok
    assert run(client, py27, "platform.python_version") == "2.7.18"
    assert run(client, py312, "platform.python_version") == "3.12.1"
    assert client.use_environment(None).ok


def test_a_node_that_joins_later_gets_it_on_its_first_call(cluster, py27):
    client = cluster.client
    cluster.add_node("node-late", 1)
    client.wait_for_workers(3, timeout=60)
    late = next(
        a
        for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
        if w["name"] == "node-late-0"
    )
    version = client.submit(
        py27.call, "platform.python_version", workers=[late], pure=False
    ).result()
    assert version == "2.7.18"
    assert (cluster.caches["node-late"] / py27.id).is_dir()
