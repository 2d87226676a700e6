"""A requirements file, a lock (``uv.lock`` and ``pylock.toml``) and a local
project (``pip=["./proj"]``) on one real cluster: after each
``use_environment`` the worker imports exactly what was asked, from the copy
in its node's cache, offline from the fixtures' wheel folder.

One cluster (one node, one worker) serves the whole module; each test builds
on the ``venv`` fixture, which holds tabulate 0.9.0 and neither six nor
python-dateutil.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import dask.config
import pytest
from distributed import Client

from envship.client.index import index_args
from envship.client.uv import uv_binary
from fixtures.cluster import local_cluster
from fixtures.wheels import wheel_folder

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# The venv fixture has no numpy; the tests' own interpreter has.
pytestmark = pytest.mark.filterwarnings("ignore:.* lacks numpy:UserWarning")


@dataclass
class Cluster:
    client: Client
    cache: Path  # the node's cache folder
    venv: str  # the base every test builds on
    wheels: Path  # the wheel folder pip's configuration names


@pytest.fixture(scope="module")
def cluster(env_prefix, tmp_path_factory):
    """One node with one worker, and pip configured for the wheel folder only
    (as a site without network): a private store and builds folder."""
    root = tmp_path_factory.mktemp("spec-cluster")
    wheels = wheel_folder()
    store, builds = root / "store", root / "builds"
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("PIP_", "UV_")):
                patch.delenv(name)
        patch.setenv("PIP_CONFIG_FILE", os.devnull)
        patch.setenv("PIP_FIND_LINKS", str(wheels))
        patch.setenv("PIP_NO_INDEX", "1")
        patch.setenv("DASK_ENVSHIP__STORE", str(store))
        patch.setenv("DASK_ENVSHIP__BUILD__DIRECTORY", str(builds))
        patch.chdir(root)  # no project's uv.toml around
        assert index_args() == ["--find-links", str(wheels), "--no-index"]
        config = {"envship.store": str(store), "envship.build.directory": str(builds)}
        with dask.config.set(config):
            venv = str(env_prefix("venv"))
            with local_cluster(root / "cluster", {"node": 1}) as (client, caches):
                yield Cluster(client, caches["node"], venv, wheels)


def imported(names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``{distribution: (version, module file)}`` as the worker imports them."""
    from importlib import import_module
    from importlib.metadata import version

    modules = {"python-dateutil": "dateutil"}
    return {
        name: (version(name), import_module(modules.get(name, name)).__file__ or "")
        for name in names
    }


def on_worker(cluster: Cluster, *names: str) -> dict[str, str]:
    """The versions of ``names`` the one worker imports, each from its node's cache."""
    (seen,) = cluster.client.run(imported, names).values()
    for name, (_, file) in seen.items():
        assert file.startswith(str(cluster.cache)), (name, file)
    return {name: v for name, (v, _) in seen.items()}


def narrow_folder(cluster: Cluster, folder: Path) -> list[str]:
    """uv index arguments for a folder with tabulate 0.8.10 but not 0.9.0.

    A lock made there says 0.8.10 where a resolve of the full folder would
    pick 0.9.0: the workers' 0.8.10 comes from the lock, not a new resolve.
    """
    folder.mkdir(exist_ok=True)
    for wheel in cluster.wheels.glob("*.whl"):
        if not wheel.name.startswith("tabulate-0.9.0"):
            shutil.copy(wheel, folder / wheel.name)
    return ["--no-index", "--find-links", str(folder)]


def test_a_requirements_file_on_a_cluster(cluster, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tabulate==0.8.10\nsix==1.16.0\n")
    report = cluster.client.use_environment(
        requirements=requirements, base=cluster.venv
    )
    assert report.ok, report
    assert on_worker(cluster, "tabulate", "six") == {
        "tabulate": "0.8.10",
        "six": "1.16.0",
    }


def test_a_uv_lock_on_a_cluster(cluster, tmp_path):
    project = tmp_path / "analysis"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "analysis"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["tabulate", "six"]\n'
    )
    narrow = narrow_folder(cluster, tmp_path / "narrow")
    python = str(Path(cluster.venv) / "bin" / "python")
    subprocess.run(
        [uv_binary(), "lock", "-q", "--python", python, "--directory", str(project),
         *narrow],
        check=True,
    )  # fmt: skip
    assert 'name = "tabulate"\nversion = "0.8.10"' in (project / "uv.lock").read_text()
    report = cluster.client.use_environment(lock=project / "uv.lock", base=cluster.venv)
    assert report.ok, report
    assert on_worker(cluster, "tabulate", "six") == {
        "tabulate": "0.8.10",
        "six": "1.16.0",
    }


def test_a_pylock_on_a_cluster(cluster, tmp_path):
    requested = tmp_path / "requested.in"
    requested.write_text("tabulate\npython-dateutil\n")
    lock = tmp_path / "pylock.toml"
    subprocess.run(
        [uv_binary(), "pip", "compile", "-q", "--format", "pylock.toml",
         "--python-version", "3.11", str(requested), "-o", str(lock),
         *narrow_folder(cluster, tmp_path / "narrow")],
        check=True,
    )  # fmt: skip
    report = cluster.client.use_environment(lock=lock, base=cluster.venv)
    assert report.ok, report
    assert on_worker(cluster, "tabulate", "python-dateutil", "six") == {
        "tabulate": "0.8.10",
        "python-dateutil": "2.8.2",
        "six": "1.16.0",
    }


def project_value() -> tuple[int, str]:
    import proj

    return proj.VALUE, proj.__file__ or ""


def test_a_local_project_on_a_cluster_each_call(cluster, tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "proj").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "proj"\nversion = "0.1"\n'
    )
    module = project / "proj" / "__init__.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.chdir(tmp_path)  # "./proj" is relative to the working folder
    first = cluster.client.use_environment(pip=["./proj"], base=cluster.venv)
    assert first.ok, first
    ((value, file),) = cluster.client.run(project_value).values()
    assert value == 1 and file.startswith(str(cluster.cache))

    # an edit of one .py and the same call: the project's current state
    module.write_text("VALUE = 2\n")
    second = cluster.client.use_environment(pip=["./proj"], base=cluster.venv)
    assert second.ok, second
    ids = [{r.environment for r in report.values()} for report in (first, second)]
    assert ids[0] != ids[1]
    ((value, file),) = cluster.client.run(project_value).values()
    assert value == 2 and file.startswith(str(cluster.cache))
    # a thin pack: the node writes the project's files and those naming the
    # build's folder (scripts, pyvenv.cfg), and links the base's
    (unpacked,) = (second.unpacked or {}).values()
    assert 0 < unpacked["written"] < unpacked["linked"] / 50
