"""Derived environments built with real uv from a local wheel folder, offline.

Each build starts from a fixture environment (conda ``base``, ``venv``); the
base's checksums (every file's bytes and mode, every link) must not change,
after uv and after pip in the derived environment.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import dask.config
import pytest
import xxhash

import envship
from envship.client.build import BuildSpec, build_environment, build_record
from envship.client.uv import uv_binary
from envship.errors import EnvshipError
from fixtures.wheels import wheel_folder


@pytest.fixture(scope="module")
def wheels() -> list[str]:
    return ["--no-index", "--find-links", str(wheel_folder())]


@pytest.fixture
def builds(tmp_path):
    folder = tmp_path / "builds"
    with dask.config.set({"envship.build.directory": str(folder)}):
        yield folder


def checksums(prefix: Path) -> dict[str, str]:
    """Every entry's kind, mode and content (or link target), by relative path."""
    sums = {}
    for root, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = "link:" + os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                what = "dir"
            else:
                with open(path, "rb") as f:
                    what = xxhash.xxh3_64_hexdigest(f.read())
            sums[os.path.relpath(path, prefix)] = f"{st.st_mode:o}:{what}"
    return sums


def run_python(prefix: Path, code: str) -> str:
    done = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def pip_install(prefix: Path, wheels: list[str], *args: str) -> None:
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    subprocess.run(
        [str(prefix / "bin" / "python"), "-m", "pip", "install", "-q", *wheels, *args],
        check=True,
        env=env,
    )


def test_conda_base_list_builds_once_packs_and_leaves_base_unchanged(
    env_prefix, builds, wheels, store
):
    base = env_prefix("base")
    before = checksums(base)
    spec = BuildSpec(pip=("tabulate==0.8.10", "python-dateutil"), base=str(base))

    started = time.perf_counter()
    prefix = build_environment(spec, index_args=wheels)
    first = time.perf_counter() - started
    assert prefix.parent == builds and prefix.name.startswith(base.name + "+")
    assert (
        run_python(prefix, "import tabulate, dateutil; print(tabulate.__version__)")
        == "0.8.10"
    )
    assert run_python(prefix, "import sys; print(sys.prefix)") == str(prefix)
    assert checksums(base) == before

    record = build_record(prefix)
    started = time.perf_counter()
    again = build_environment(spec, index_args=wheels)
    cached = time.perf_counter() - started
    assert again == prefix
    assert build_record(prefix) == record  # no second build wrote its record
    print(
        f"conda base: first build {first:.2f} s, cached call {cached:.2f} s, {record}"
    )

    artifact = envship.pack(prefix, archive=False)
    assert artifact.manifest.kind == "conda"
    assert artifact.manifest.packages["distributed"] == "2026.8.0"
    assert artifact.name == prefix.name

    pip_install(prefix, wheels, "six==1.16.0")
    assert checksums(base) == before


def test_venv_base_uv_and_pip_replace_linked_files_without_touching_base(
    env_prefix, builds, wheels, store
):
    base = env_prefix("venv")  # holds tabulate 0.9.0
    before = checksums(base)

    # uv replaces a package whose files are hard links to the base's.
    moved = build_environment(
        BuildSpec(pip=("tabulate==0.8.10",), base=str(base)), index_args=wheels
    )
    assert run_python(moved, "import tabulate; print(tabulate.__version__)") == "0.8.10"
    assert checksums(base) == before
    # Compiled as pip would (node trees are read-only: workers could not
    # cache it), and python uses that .pyc: importing writes nothing.
    (pyc,) = moved.glob("lib/python3.*/site-packages/__pycache__/tabulate.*.pyc")
    stamp = pyc.stat().st_mtime_ns
    run_python(moved, "import tabulate")
    assert pyc.stat().st_mtime_ns == stamp

    # pip reinstalls the same linked package over itself in another build.
    kept = build_environment(BuildSpec(pip=("six",), base=str(base)), index_args=wheels)
    assert kept != moved
    pip_install(kept, wheels, "--force-reinstall", "--no-deps", "tabulate==0.9.0")
    assert (
        run_python(kept, "import tabulate, six; print(tabulate.__version__)") == "0.9.0"
    )
    assert checksums(base) == before

    artifact = envship.pack(kept, archive=False)
    assert artifact.manifest.kind == "venv"
    assert (kept / "pyvenv.cfg").read_text().count(str(base)) == 0


def test_a_pin_that_would_move_distributed_is_refused_before_building(
    env_prefix, builds, wheels
):
    base = env_prefix("base")
    spec = BuildSpec(pip=("tabulate", "distributed==2024.1.0"), base=str(base))
    with pytest.raises(EnvshipError) as caught:
        build_environment(spec, index_args=wheels)
    message = str(caught.value)
    assert "distributed==2024.1.0" in message and "distributed==2026.8.0" in message
    assert "nothing was built" in message
    assert [p.name for p in builds.iterdir()] == []


def test_requirements_file(env_prefix, builds, wheels, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tabulate==0.8.10\nsix\n")
    spec = BuildSpec(requirements=requirements, base=str(env_prefix("base")))
    prefix = build_environment(spec, index_args=wheels)
    assert (
        run_python(prefix, "import tabulate, six; print(tabulate.__version__)")
        == "0.8.10"
    )


def test_pylock_installs_exactly_what_it_lists(env_prefix, builds, wheels, tmp_path):
    requested = tmp_path / "requested.in"
    requested.write_text("tabulate==0.8.10\npython-dateutil\n")
    lock = tmp_path / "pylock.toml"
    subprocess.run(
        [uv_binary(), "pip", "compile", "-q", "--format", "pylock.toml",
         "--python-version", "3.11", str(requested), "-o", str(lock), *wheels],
        check=True,
    )  # fmt: skip
    base = env_prefix("venv")
    prefix = build_environment(BuildSpec(lock=lock, base=str(base)), index_args=wheels)
    out = run_python(
        prefix, "import tabulate, dateutil, six; print(tabulate.__version__)"
    )
    assert out == "0.8.10"
    assert build_record(prefix)["requirements"][:3] == [
        "python-dateutil==2.8.2",
        "six==1.16.0",
        "tabulate==0.8.10",
    ]


def test_a_local_project_is_built_in_its_current_state(
    env_prefix, builds, wheels, tmp_path
):
    project = tmp_path / "proj"
    (project / "proj").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "proj"\nversion = "0.1"\n'
    )
    module = project / "proj" / "__init__.py"
    module.write_text("EDIT = 1\n")
    spec = BuildSpec(pip=(str(project),), base=str(env_prefix("venv")))
    first = build_environment(spec, index_args=wheels)
    assert run_python(first, "import proj; print(proj.EDIT)") == "1"
    module.write_text("EDIT = 2\n")
    second = build_environment(spec, index_args=wheels)
    assert second != first
    assert run_python(second, "import proj; print(proj.EDIT)") == "2"


def test_a_range_that_excludes_the_pinned_version_is_refused_by_name(
    env_prefix, builds, wheels
):
    spec = BuildSpec(pip=("distributed<2025",), base=str(env_prefix("base")))
    with pytest.raises(EnvshipError) as caught:
        build_environment(spec, index_args=wheels)
    message = str(caught.value)
    assert "would move distributed" in message and "distributed==2026.8.0" in message
    assert "distributed<2025" in message  # uv's own words, naming the requirement
    assert [p.name for p in builds.iterdir()] == []


def test_a_uv_lock_installs_what_it_lists(env_prefix, builds, wheels, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "analysis"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["tabulate==0.8.10", "six"]\n'
    )
    base = env_prefix("base")
    subprocess.run(
        [uv_binary(), "lock", "-q", "--python", str(base / "bin" / "python"),
         "--directory", str(project), *wheels],
        check=True,
    )  # fmt: skip
    prefix = build_environment(
        BuildSpec(lock=project / "uv.lock", base=str(base)), index_args=wheels
    )
    out = run_python(prefix, "import tabulate, six; print(tabulate.__version__)")
    assert out == "0.8.10"
    assert build_record(prefix)["requirements"] == ["six==1.16.0", "tabulate==0.8.10"]


def test_a_longer_list_starts_from_the_cached_build(env_prefix, builds, wheels):
    base = env_prefix("venv")
    before = checksums(base)
    first = build_environment(
        BuildSpec(pip=("tabulate==0.8.10",), base=str(base)), index_args=wheels
    )
    longer = build_environment(
        BuildSpec(pip=("tabulate==0.8.10", "six"), base=str(base)), index_args=wheels
    )
    assert build_record(longer)["parent"] == str(first)
    out = run_python(longer, "import tabulate, six, sys; print(tabulate.__version__)")
    assert out == "0.8.10"
    assert run_python(longer, "import sys; print(sys.prefix)") == str(longer)
    assert str(first) not in (longer / "pyvenv.cfg").read_text()
    assert (longer / "bin" / "tabulate").read_text().startswith(f"#!{longer}/bin/")
    assert checksums(base) == before
    shorter = build_environment(
        BuildSpec(pip=("six",), base=str(base)), index_args=wheels
    )
    assert build_record(shorter)["parent"] is None  # first holds tabulate 0.8.10
    assert (
        run_python(shorter, "import tabulate; print(tabulate.__version__)") == "0.9.0"
    )
