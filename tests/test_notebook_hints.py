"""What a user is told when an environment lacks numpy (or pandas, lz4) that
the client has: once at switch time, and as an EnvshipError naming the side
that lacks it when a bridge call's arrays cannot cross. A real cluster, real
fixture environments: ``base`` has no numpy, ``sklearn-dev`` has it, ``py27``
has none, ``py2-sklearn-dev`` has numpy 1.16."""

from __future__ import annotations

import sys
import warnings

import cloudpickle
import numpy as np
import pytest
from distributed.versions import get_package_info

import envship
from envship import EnvshipError
from envship.client.compat import OPTIONAL_PACKAGES, missing_optional
from envship.client.switch import manifest_of
from fixtures.cluster import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("cluster"), {"a": 1}) as c:
        yield c


def switch(client, env) -> tuple[envship.SwitchReport, list[str]]:
    """Switch the workers to ``env``; the report and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = client.use_environment(env)
    assert report.ok
    return report, [str(w.message) for w in caught]


def test_a_switch_names_the_optional_packages_the_environment_lacks(
    cluster, env_prefix, store
):
    client = cluster.client
    base = envship.pack(env_prefix("base"), name="base", store=store)
    assert "numpy" not in base.manifest.packages  # a fact of the fixture

    report, said = switch(client, base)
    assert report.missing_optional == ("numpy",)
    assert said == [
        "base lacks numpy that this client has: results of those types cannot "
        "be unpickled on the workers (install them into base to use them there)"
    ]
    assert "the environment lacks numpy that this client has" in repr(report)

    # Once per environment and client: the report still says it.
    report, said = switch(client, base)
    assert report.missing_optional == ("numpy",) and said == []

    report, said = switch(client, None)  # the nannies' own: nothing to compare
    assert report.missing_optional == () and said == []
    assert "lacks" not in repr(report)


def test_an_environment_with_numpy_lacks_nothing(env_prefix, store):
    sklearn = envship.pack(env_prefix("sklearn-dev"), store=store, archive=False)
    assert "numpy" in sklearn.manifest.packages
    assert (
        missing_optional(manifest_of(sklearn), get_package_info(OPTIONAL_PACKAGES))
        == ()
    )


def test_an_old_manifest_is_checked_against_the_environment_files(env_prefix, store):
    sklearn = envship.pack(env_prefix("sklearn-dev"), store=store, archive=False)
    manifest = manifest_of(sklearn)
    # As an envship that recorded no numpy would have packed it.
    old = manifest.replace(packages={"distributed": manifest.packages["distributed"]})
    client_has = {"numpy": "2.0", "pandas": None, "lz4": "4.0"}
    assert missing_optional(old, client_has) == ("numpy", "lz4")
    table = sklearn.table()
    assert table is not None
    files = [e.path for e in table.files]
    assert missing_optional(old, client_has, files) == ("lz4",)


def test_an_array_result_on_workers_without_numpy(cluster, env_prefix, store):
    client = cluster.client
    py2 = envship.foreign(client, env_prefix("py2-sklearn-dev"))
    base = envship.pack(env_prefix("base"), name="base", store=store)
    switch(client, base)
    try:
        with pytest.raises(EnvshipError) as info:
            client.submit(py2.call, "numpy.arange", 3, pure=False).result()
        error = info.value
        assert error.env == "base"
        assert "the result of numpy.arange" in error.problem
        assert f"from {py2.name}, holds a numpy array" in error.problem
        assert "no numpy" in error.problem
        assert error.fix is not None
        assert "install numpy into base" in error.fix
        assert "return lists" in error.fix
        # The same call works once the workers run where numpy is.
        switch(client, None)
        assert list(client.submit(py2.call, "numpy.arange", 3).result()) == [0, 1, 2]
    finally:
        switch(client, None)


def test_an_array_argument_to_an_environment_without_numpy(cluster, env_prefix):
    client = cluster.client
    py27 = envship.foreign(client, env_prefix("py27"))
    with pytest.raises(EnvshipError) as info:
        client.submit(py27.call, "__builtin__.len", np.arange(3), pure=False).result()
    error = info.value
    assert error.env == py27.name
    assert "the arguments of __builtin__.len hold a numpy array" in error.problem
    assert f"{py27.name} (Python 2.7.18) has no numpy" in error.problem
    assert error.fix is not None and f"install numpy into {py27.name}" in error.fix
    assert (
        client.submit(py27.call, "__builtin__.len", [0, 1, 2], pure=False).result() == 3
    )
