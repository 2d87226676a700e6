"""Calls into environments whose Python cannot host a worker (Python 2.7,
another Python 3), from tasks, on a real cluster: the bridge of each worker
started on first use, errors with their traceback, crashes, modules sent with
``upload_file``, workers switched elsewhere meanwhile, nodes that join later."""

from __future__ import annotations

import sys
from pathlib import PurePosixPath

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
    # Its install started no zygote: Python 2.7 cannot run one (it failed
    # with a traceback in the nannies' logs).
    for log in cluster.folder.glob("node-a-*.log"):
        assert 'zygote.py", line' not in log.read_text(), log


def test_an_exception_arrives_with_its_traceback(cluster, py27):
    with pytest.raises(ValueError, match="math domain error") as info:
        run(cluster.client, py27, "math.sqrt", -1.0)
    assert "under Python 2.7.18" in str(info.value)
    assert "Traceback (most recent call last)" in str(info.value)
    with pytest.raises(ImportError, match="No module named nothing_here"):
        run(cluster.client, py27, "nothing_here.f")
    with pytest.raises(TypeError, match="cannot cross into"):
        run(cluster.client, py27, "json.dumps", lambda: 1)
    # A class Python 2 lacks: named.
    with pytest.raises(TypeError, match="it holds a pathlib.PurePosixPath"):
        run(cluster.client, py27, "os.path.basename", PurePosixPath("/a/b"))


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


# -- scikit-learn 0.20 under Python 2.7, numpy arrays both ways -------------------


@pytest.fixture(scope="module")
def py2(cluster, env_prefix):
    return cluster.client.use_environment(env_prefix("py2-sklearn-dev"))


def test_fit_and_predict_with_scikit_learn_0_20_under_python_2(cluster, py2):
    import numpy as np

    client = cluster.client
    versions = run(client, py2, "legacy_model.version")
    assert versions["python"].startswith("2.7.18") and versions["sklearn"] == "0.20.4"
    X, y = np.array([[0.0], [1.0], [2.0]]), np.array([0.0, 2.0, 4.0])
    predicted = run(client, py2, "legacy_model.fit_predict", X, y, [[3.0], [4.0]])
    assert isinstance(predicted, np.ndarray)
    np.testing.assert_allclose(predicted, [6.0, 8.0])
    # A model kept as opaque bytes between tasks: fit in one, predict in another.
    model = client.submit(py2.call, "legacy_model.fit_model", X, y, pure=False)
    later = client.submit(py2.call, "legacy_model.predict", model, [[10.0]], pure=False)
    np.testing.assert_allclose(later.result(), [20.0])
    # The fitted object itself has no class on this side: said so, by name.
    with pytest.raises(TypeError, match="cannot cross back") as info:
        run(client, py2, "legacy_model.fit", X, y)
    assert "it holds a sklearn.linear_model.base.LinearRegression" in str(info.value)


def test_numpy_arrays_of_several_dtypes_round_trip_exactly(cluster, py2):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 2, 7).astype(bool),
        rng.integers(-128, 127, (3, 4), dtype=np.int8),
        rng.integers(0, 60000, 5, dtype=np.uint16),
        rng.integers(-(2**31), 2**31 - 1, (2, 3, 2), dtype=np.int32),
        rng.integers(-(2**62), 2**62, 9, dtype=np.int64),
        rng.standard_normal((4, 5)).astype(np.float32),
        np.asfortranarray(rng.standard_normal((3, 6))),
        rng.standard_normal(4) + 1j * rng.standard_normal(4),
        np.array([b"ab", b"\x00\xff", b"xyz"]),
        np.array(["h\u00e9llo", "w"]),
        np.array(["2026-11-27T12:00", "1999-01-01"], dtype="datetime64[ns]"),
        np.zeros((0, 3)),
        np.array([(1, 2.5), (3, -1.0)], dtype=[("a", "<i4"), ("b", ">f8")]),
        np.arange(12.0)[::3],  # not contiguous
    ]
    back = run(cluster.client, py2, "legacy_model.echo", *arrays)[0]
    for sent, got in zip(arrays, back, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert sent.tobytes() == np.ascontiguousarray(got).tobytes()
    scalars = run(
        cluster.client, py2, "legacy_model.echo", np.float32(1.5), np.int64(-7)
    )
    assert scalars[0] == (np.float32(1.5), np.int64(-7))
    assert type(scalars[0][0]) is np.float32
    # Text and bytes: a Python 3 str arrives as unicode, a bytearray as itself.
    assert run(
        cluster.client, py2, "legacy_model.echo", "h\u00e9", bytearray(b"\0\xff")
    )[0] == ("h\u00e9", bytearray(b"\0\xff"))
    with pytest.raises(TypeError, match=r"dtype object"):
        run(cluster.client, py2, "legacy_model.roundtrip", np.array([None, 1]))
