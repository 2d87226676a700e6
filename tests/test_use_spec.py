"""A package list: pip's index configuration as uv arguments, the arguments of
``use_environment(pip=...)``/``envship build``, environment.yml, and a real
cluster whose workers end up importing what the list asked for, offline from
a wheel folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
from click.testing import CliRunner

import envship
from envship.cli import main
from envship.client.index import index_args, pip_config_files, pip_index_options
from envship.client.packages import (
    CONDA_TOOLS,
    read_environment_file,
    spec_for,
)
from envship.errors import EnvshipError
from fixtures.cluster import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MIRROR = "https://mirror.example.org/simple"


# -- index options -----------------------------------------------------------


@pytest.fixture
def pip_conf(tmp_path):
    """A pip.conf with index options in [global] and [install], and a clean
    environment naming it (HOME in tmp_path: no user file of this machine)."""
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\n"
        f"index-url = {MIRROR}\n"
        "extra-index-url =\n"
        "    https://a.example.org/simple\n"
        "    https://b.example.org/simple\n"
        "timeout = 60\n"
        "[install]\n"
        "find-links = /srv/wheels\n"
        "[download]\n"
        "no-index = true\n"
    )
    environ = {"HOME": str(tmp_path), "PIP_CONFIG_FILE": str(conf)}
    return conf, environ


def test_index_args_from_a_pip_config_file(pip_conf, tmp_path):
    conf, environ = pip_conf
    assert index_args(environ, start=tmp_path) == [
        "--index-url", MIRROR,
        "--extra-index-url", "https://a.example.org/simple",
        "--extra-index-url", "https://b.example.org/simple",
        "--find-links", "/srv/wheels",
        "--index-strategy", "unsafe-best-match",  # pip's way with several
    ]  # fmt: skip
    # [download] is not an install section: its no-index is not taken
    own_strategy = environ | {"UV_INDEX_STRATEGY": "first-index"}
    assert "--index-strategy" not in index_args(own_strategy, start=tmp_path)


def test_pip_variables_win_over_the_files(pip_conf, tmp_path):
    conf, environ = pip_conf
    environ |= {
        "PIP_INDEX_URL": "https://other.example.org/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "/w1 /w2",
        "PIP_NO_INDEX": "1",
    }
    assert index_args(environ, start=tmp_path) == [
        "--index-url", "https://other.example.org/simple",
        "--find-links", "/w1", "--find-links", "/w2",
        "--no-index",
    ]  # fmt: skip
    assert index_args(environ | {"PIP_NO_INDEX": "0"}, start=tmp_path)[-1] == "/w2"


def test_uv_own_configuration_wins(pip_conf, tmp_path):
    conf, environ = pip_conf
    uv_env = environ | {"UV_INDEX_URL": "https://uv.example.org/simple"}
    assert "--index-url" not in index_args(uv_env, start=tmp_path)
    assert "--extra-index-url" in index_args(uv_env, start=tmp_path)
    assert index_args(environ | {"UV_NO_INDEX": "1"}, start=tmp_path) == [
        "--find-links", "/srv/wheels",
    ]  # fmt: skip
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\n[tool.uv]\nfind-links = ["/uv/wheels"]\n'
    )
    args = index_args(environ, start=project / "src")
    assert "--find-links" not in args and "--index-url" in args
    (project / "uv.toml").write_text('[[index]]\nurl = "https://u/simple"\n')
    assert index_args(environ, start=project) == ["--find-links", "/srv/wheels"]
    # UV_NO_CONFIG: uv reads no file, so pip's options are passed again
    assert "--index-url" in index_args(environ | {"UV_NO_CONFIG": "1"}, project)


def test_pip_config_files_in_pips_order(tmp_path):
    home = tmp_path / "home"
    user = home / ".config" / "pip" / "pip.conf"
    user.parent.mkdir(parents=True)
    user.write_text(f"[global]\nindex-url = {MIRROR}\n")
    environ = {"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    assert user in pip_config_files(environ)
    assert pip_index_options(environ)["index-url"] == MIRROR
    # a PIP_CONFIG_FILE that exists replaces the user's files, as for pip
    own = tmp_path / "own.conf"
    own.write_text("[install]\nno-index = yes\n")
    environ["PIP_CONFIG_FILE"] = str(own)
    assert user not in pip_config_files(environ)
    assert index_args(environ, start=tmp_path)[-1] == "--no-index"
    # os.devnull: no file at all
    assert pip_config_files(environ | {"PIP_CONFIG_FILE": os.devnull}) == []


def test_every_global_section_comes_before_every_install_section(tmp_path):
    # pip: a site file's [install] beats the user file's [global].
    site = tmp_path / "xdg" / "pip" / "pip.conf"
    site.parent.mkdir(parents=True)
    site.write_text("[install]\nindex-url = https://site/simple\n")
    user = tmp_path / "home" / ".config" / "pip" / "pip.conf"
    user.parent.mkdir(parents=True)
    user.write_text(f"[global]\nindex-url = {MIRROR}\n")
    environ = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_DIRS": str(tmp_path / "xdg")}
    assert pip_config_files(environ).index(site) < pip_config_files(environ).index(user)
    assert pip_index_options(environ)["index-url"] == "https://site/simple"


# -- arguments -----------------------------------------------------------------


def test_contradictory_arguments_are_refused(tmp_path, store):
    with pytest.raises(EnvshipError, match="give the base once"):
        spec_for("sklearn-dev", base="base", pip=["tabulate"])
    lock = tmp_path / "pylock.toml"
    lock.write_text("")
    with pytest.raises(EnvshipError, match="cannot be combined"):
        spec_for(pip=["tabulate"], lock=lock)
    with pytest.raises(EnvshipError, match="no list is given"):
        spec_for(base="sklearn-dev")
    with pytest.raises(EnvshipError, match="no such requirements file"):
        spec_for(requirements=tmp_path / "missing.txt")
    with pytest.raises(EnvshipError, match="nothing to build"):
        envship.build()
    artifact = envship.pack(fixtures_env("venv"), name="venv", archive=False)
    with pytest.raises(EnvshipError, match="not on an artifact"):
        spec_for(artifact, pip=["tabulate"])
    # the public call refuses before it touches the client (none is given here)
    with pytest.raises(EnvshipError, match="give the base once"):
        envship.use_environment(None, "venv", base="venv", pip=["tabulate"])
    assert spec_for("venv", pip="tabulate").base == "venv"
    assert spec_for(pip=["tabulate"]).base is None  # the client's own


def test_cli_refuses_contradictions_before_connecting(tmp_path):
    result = CliRunner().invoke(
        main,
        ["use", "venv", "--pip", "tabulate", "--lock", str(tmp_path / "uv.lock")],
        env={"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1"},
    )
    assert result.exit_code == 1
    assert "error: lock" in result.output
    result = CliRunner().invoke(main, ["use", "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "package list" in result.output


def fixtures_env(name: str) -> Path:
    import fixtures

    return fixtures.build(name)


# -- environment.yml -------------------------------------------------------------


def test_environment_yml_with_conda_packages_and_no_conda(tmp_path, store):
    assert not any(shutil.which(tool) for tool in CONDA_TOOLS)  # as on this machine
    yml = tmp_path / "environment.yml"
    yml.write_text(
        "name: geo\nchannels: [conda-forge]\ndependencies:\n"
        "  - python=3.11\n  - pip\n  - conda-forge::gdal>=3.8\n  - numpy\n"
        "  - pip:\n    - tabulate==0.8.10\n    - ./proj\n"
    )
    found = read_environment_file(yml)
    assert found.conda_names == ["python", "pip", "gdal", "numpy"]
    assert found.pip == ("tabulate==0.8.10", str(tmp_path / "proj"))
    venv = str(fixtures_env("venv"))
    with pytest.raises(EnvshipError) as refused:
        spec_for(venv, file=yml)
    text = str(refused.value)
    assert "gdal, numpy" in text and "no conda, mamba, micromamba or pixi" in text
    assert "micromamba create" in text
    result = CliRunner().invoke(main, ["build", venv, "--file", str(yml)])
    assert result.exit_code == 1 and "gdal, numpy" in result.output
    # a conda base holding them: only the pip part is left to build
    sklearn_dev = str(fixtures_env("sklearn-dev"))
    yml.write_text(
        "dependencies:\n  - python=3.11\n  - numpy\n  - scikit-learn\n"
        "  - pip:\n    - tabulate==0.8.10\n"
    )
    spec = spec_for(sklearn_dev, file=yml)
    assert spec.pip == ("tabulate==0.8.10",) and spec.base == sklearn_dev


def test_environment_yml_errors(tmp_path):
    yml = tmp_path / "environment.yml"
    yml.write_text("name: x\n")
    with pytest.raises(EnvshipError, match="no `dependencies:` list"):
        read_environment_file(yml)
    yml.write_text("dependencies:\n  - pip:\n    - --index-url https://x\n")
    with pytest.raises(EnvshipError, match="option line"):
        read_environment_file(yml)
    with pytest.raises(EnvshipError, match="cannot read it"):
        read_environment_file(tmp_path / "missing.yml")


# -- built and used, offline from a wheel folder ---------------------------------


def tabulate_version() -> tuple[str, str]:
    import tabulate

    return sys.prefix, tabulate.__version__


@pytest.fixture(scope="module")
def wheels() -> Path:
    """A folder with tabulate 0.8.10's wheel (fixtures.wheels, else pip download)."""
    try:
        from fixtures.wheels import wheel_folder
    except ImportError:  # before the builder's fixture
        folder = Path.home() / ".cache" / "envship-fixtures" / "wheels" / "spec"
        if not list(folder.glob("tabulate-0.8.10-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--dest", str(folder), "tabulate==0.8.10"],
                check=True,
            )  # fmt: skip
        return folder
    return wheel_folder()


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """A private folder of built environments (``envship.build.directory``)."""
    import dask.config

    folder = tmp_path / "builds"
    monkeypatch.setenv("DASK_ENVSHIP__BUILD__DIRECTORY", str(folder))
    with dask.config.set({"envship.build.directory": str(folder)}):
        yield folder


@pytest.fixture
def offline(wheels, builds, monkeypatch, tmp_path):
    """pip configured for the wheel folder only, as a site without network."""
    for name in list(os.environ):
        if name.startswith(("PIP_", "UV_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.chdir(tmp_path)  # no project's uv.toml around
    assert index_args() == ["--find-links", str(wheels), "--no-index"]
    return wheels


def test_package_list_on_a_cluster(offline, builds, store, tmp_path):
    venv = str(fixtures_env("venv"))
    with local_cluster(tmp_path / "cluster", {"node-a": 1}) as (client, caches):
        first = client.use_environment(pip=["tabulate==0.8.10"], base=venv)
        assert first.ok, first
        seen = client.run(tabulate_version)
        assert {v for _, v in seen.values()} == {"0.8.10"}
        built = {p for p, _ in seen.values()}
        assert len(built) == 1 and venv not in built  # the node cache's copy
        (artifact_id,) = {r.environment for r in first.values()}
        record = envship.ArtifactStore(store).resolve(artifact_id)
        assert record is not None
        stamp = record.manifest.created
        built_at = Path(record.manifest.source_prefix)
        assert built_at.parent == builds
        folder = built_at.stat()

        again = client.use_environment(venv, pip=["tabulate==0.8.10"])
        assert again.ok
        assert {r.environment for r in again.values()} == {artifact_id}
        # a warm switch: no file written nor linked on the node
        unpacked = (again.unpacked or {}).values()
        assert all(u["written"] == u["linked"] == 0 for u in unpacked)
        assert (
            envship.ArtifactStore(store).resolve(artifact_id).manifest.created == stamp
        )
        # built nothing: the same folder, not replaced nor written into
        now = built_at.stat()
        assert (now.st_ino, now.st_mtime_ns) == (folder.st_ino, folder.st_mtime_ns)
        assert {v for _, v in client.run(tabulate_version).values()} == {"0.8.10"}

        prepared = client.prepare_environment(pip=["tabulate==0.8.10"], base=venv)
        assert prepared.ok and {r.environment for r in prepared.values()} == {
            artifact_id
        }

        # per task: the same list names the environment the workers run in
        with envship.environment(client=client, pip=["tabulate==0.8.10"], base=venv):
            # a lambda: the scheduler unpickles task graphs (see test_shared)
            task = client.submit(lambda: __import__("tabulate").__version__)
            assert task.result() == "0.8.10"

        use = ["use", venv, "--pip", "tabulate==0.8.10"]
        result = CliRunner().invoke(
            main, [*use, "--scheduler", client.scheduler.address]
        )
        assert result.exit_code == 0, result.output
        assert artifact_id[:12] in result.output and " ok" in result.output

    # the same environment: the switch recorded its table, the CLI writes the
    # archive once, then finds it
    build = ["build", venv, "--pip", "tabulate==0.8.10"]
    result = CliRunner().invoke(main, build)
    assert result.exit_code == 0, result.output
    assert artifact_id[:12] in result.output.splitlines()[0]
    result = CliRunner().invoke(main, build)
    assert result.output.startswith(f"cache hit: {Path(venv).name}+tabulate ")


def test_pip_only_environment_yml_builds(offline, store, tmp_path):
    yml = tmp_path / "environment.yml"
    yml.write_text("dependencies:\n  - pip\n  - pip:\n    - tabulate==0.8.10\n")
    venv = str(fixtures_env("venv"))
    result = CliRunner().invoke(
        main, ["build", venv, "--file", str(yml), "--name", "tab"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(("packed tab ", "cache hit: tab "))
    artifact = envship.ArtifactStore(store).resolve("tab")
    assert artifact is not None
    python = Path(artifact.manifest.source_prefix) / "bin" / "python"
    out = subprocess.run(
        [python, "-c", "import tabulate; print(tabulate.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "0.8.10"


def test_a_pin_that_would_move_distributed_is_refused(offline, builds, store):
    venv = str(fixtures_env("venv"))
    with pytest.raises(EnvshipError, match="would move distributed") as refused:
        envship.build(pip=["distributed==2024.1.0"], base=venv)
    assert "nothing was built" in str(refused.value)
    assert envship.ArtifactStore(store).artifacts() == []
    assert not builds.exists() or not [
        p for p in builds.iterdir() if not p.name.startswith(".")
    ]


def test_a_build_on_the_nannies_own_environment_ships_what_it_adds(
    offline, builds, store, tmp_path
):
    # The client's own environment is the one the nannies run in (as on a
    # cluster started from the same conda environment): a build on it travels
    # as a thin pack of what the list added; the node copies the other files
    # from its own environment, each hashed again, and never writes into it.
    own = Path(sys.prefix)
    some = sorted((own / "lib").glob("python3.*/site-packages/distributed/*.py"))[:50]
    before = {p: (p.stat().st_ino, p.stat().st_mode, p.read_bytes()) for p in some}
    with local_cluster(tmp_path / "cluster", {"node-a": 1, "node-b": 1}) as cluster:
        client, caches = cluster
        report = client.use_environment(pip=["tabulate==0.8.10"])
        assert report.ok, report
        seen = client.run(tabulate_version)
        assert {v for _, v in seen.values()} == {"0.8.10"}
        assert all(
            any(p.startswith(str(c)) for c in caches.values()) for p, _ in seen.values()
        )
        (artifact_id,) = {r.environment for r in report.values()}
        manifest = envship.ArtifactStore(store).resolve(artifact_id).manifest
        # Sent: the list's files and the few the build rewrote, not the environment.
        assert 0 < report.transfer.client_bytes < manifest.unpacked_size / 50
        for node in report.unpacked.values():
            assert node["linked"] > 0.9 * manifest.file_count > 10 * node["written"]

        # Out and back in: every node holds it, the registry knows its thin
        # pack's offer, so nothing is written or sent (no whole archive).
        assert client.use_environment(None).ok
        back = client.use_environment(artifact_id)
        assert back.ok and back.transfer.client_bytes == 0
        assert not envship.ArtifactStore(store).get(artifact_id).has_archive

        # A node that joins later fetches the thin pack from its peers and
        # copies the rest from its own environment: no client involved.
        cluster.add_node("node-c", 1)
        client.wait_for_workers(3, timeout=120)
        seen = client.run(tabulate_version)
        assert {v for _, v in seen.values()} == {"0.8.10"}
        assert {p for p, _ in seen.values()} >= {str(caches["node-c"] / artifact_id)}
    after = {p: (p.stat().st_ino, p.stat().st_mode, p.read_bytes()) for p in some}
    assert after == before
