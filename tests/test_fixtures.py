"""Tests for fixtures/: the environments are real, cached, and safe to share.

The fixtures are built once into the usual fixtures root (so later test
runs reuse them); the cache-behaviour tests build the small py27 env into a
temporary root instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import conda_pack
import pytest

import fixtures
import fixtures.specs
from fixtures import SPECS, EnvSpec, build
from fixtures.installer import clean_environ

CONDA_ENVS = [name for name, spec in SPECS.items() if spec.kind == "conda"]
WITH_DISTRIBUTED = ["base", "sklearn-dev", "py312", "venv"]


def run_python(prefix: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prefix / "bin" / "python", "-c", code],
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def libpython(prefix: Path) -> Path:
    """The libpython that ``prefix/bin/python`` loads, as ldd resolves it."""
    out = subprocess.run(
        ["ldd", prefix / "bin" / "python"], capture_output=True, text=True, check=True
    ).stdout
    (line,) = [line for line in out.splitlines() if "libpython" in line]
    return Path(line.split("=>")[1].split("(")[0].strip()).resolve()


@pytest.fixture(scope="session")
def prefixes() -> dict[str, Path]:
    return {name: build(name) for name in SPECS}


def test_specs_pin_the_running_dask_and_distributed():
    from importlib.metadata import version

    for name in WITH_DISTRIBUTED:
        assert f"distributed=={version('distributed')}" in SPECS[name].packages
        assert f"dask=={version('dask')}" in SPECS[name].packages
    assert SPECS["py27"].packages == ()
    assert SPECS["sklearn-dev"].python == "3.11.7"
    assert SPECS["py2-sklearn-dev"].python == "2.7.18"


def test_extra_modules_count_in_the_digest(tmp_path, monkeypatch):
    spec = SPECS["py2-sklearn-dev"]
    without = EnvSpec(spec.name, spec.kind, spec.python, spec.packages)
    assert without.dirname != spec.dirname
    edited = tmp_path / "legacy_model.py"
    edited.write_text(spec.module_sources()[0].read_text() + "# edited\n")
    before = spec.dirname
    monkeypatch.setattr(fixtures.specs, "MODULES_DIR", tmp_path)
    assert spec.dirname != before


def test_a_changed_spec_gets_another_folder():
    spec = SPECS["no-distributed"]
    changed = EnvSpec(spec.name, spec.kind, spec.python, ("tabulate==0.8.10",))
    assert changed.dirname != spec.dirname
    assert spec.dirname == EnvSpec(**vars(spec)).dirname
    assert spec.dirname.startswith("no-distributed-")


@pytest.mark.parametrize("name", CONDA_ENVS)
def test_conda_pack_loads_env_without_warnings(prefixes, name, capsys):
    prefix = prefixes[name]
    records = sorted((prefix / "conda-meta").glob("*.json"))
    assert any(r.name.startswith("python-") for r in records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = conda_pack.CondaEnv.from_prefix(str(prefix), on_missing_cache="raise")
    assert capsys.readouterr() == ("", "")
    unmanaged = [f.target for f in env.files if not f.is_conda]
    assert unmanaged == []
    # Nothing of the pyenv install it was copied from is left in bin/.
    assert not (prefix / "bin" / "pytest").exists()


@pytest.mark.parametrize("name", ["base", "py312"])
def test_records_own_pyc_files_and_link_into_the_cache(prefixes, name):
    prefix = prefixes[name]
    (record_path,) = (prefix / "conda-meta").glob("distributed-*.json")
    record = json.loads(record_path.read_text())
    assert record["build"].startswith(f"py{SPECS[name].python_tag}_")
    pycs = [f for f in record["files"] if f.endswith(".pyc")]
    assert pycs, "compiled files must belong to their distribution"
    cache = Path(record["link"]["source"])
    assert cache.parent.name == "pkgs"
    some_file = pycs[0]
    assert os.path.samefile(cache / some_file, prefix / some_file)
    for info in ("index.json", "paths.json", "repodata_record.json", "files"):
        assert (cache / "info" / info).is_file()


def test_text_files_with_the_prefix_get_a_placeholder(prefixes):
    prefix = prefixes["base"]
    (record_path,) = (prefix / "conda-meta").glob("python-3.11.7-*.json")
    paths = json.loads(record_path.read_text())["paths_data"]["paths"]
    marked = {p["_path"]: p for p in paths if "prefix_placeholder" in p}
    sysconfigdata = "lib/python3.11/_sysconfigdata__linux_x86_64-linux-gnu.py"
    assert marked[sysconfigdata]["prefix_placeholder"] == str(prefix)
    assert marked[sysconfigdata]["file_mode"] == "text"
    assert "binary" not in {p.get("file_mode") for p in paths}
    assert str(prefix) in (prefix / sysconfigdata).read_text()
    assert "/.pyenv/" not in (prefix / sysconfigdata).read_text()


@pytest.mark.parametrize("name", ["base", "py312", "py2-sklearn-dev"])
def test_libpython_comes_from_the_prefix(prefixes, name):
    prefix = prefixes[name]
    assert libpython(prefix).is_relative_to(prefix)


@pytest.mark.parametrize("name", WITH_DISTRIBUTED)
def test_distributed_imports_inside_the_env(prefixes, name):
    prefix = prefixes[name]
    proc = run_python(prefix, "import sys, distributed; print(sys.prefix)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(prefix)


def test_sklearn_dev_has_scikit_learn(prefixes):
    code = "import sklearn, tabulate; print(sklearn.__version__)"
    proc = run_python(prefixes["sklearn-dev"], code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1.9.1"


def test_py27_runs_python_2(prefixes):
    proc = run_python(prefixes["py27"], "import sys; print(sys.version_info[0])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"


# Python 2 code: print is a statement there.
PY2_SKLEARN_CHECK = """
import sys, numpy, scipy, sklearn, legacy_model
print sys.prefix
print sys.version_info[0], numpy.__version__, scipy.__version__, sklearn.__version__
print legacy_model.fit_predict([[0], [1], [2]], [1, 3, 5], [[3], [10]]).round(6)
"""


def check_py2_sklearn_env(prefix: Path) -> None:
    """Versions are the last ones for Python 2 and legacy_model fits a line."""
    proc = run_python(prefix, PY2_SKLEARN_CHECK)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        str(prefix),
        "2 1.16.6 1.2.3 0.20.4",
        "[ 7. 21.]",
    ]


def test_py2_sklearn_dev_runs_legacy_model(env_prefix):
    check_py2_sklearn_env(env_prefix("py2-sklearn-dev"))


def test_py2_pyc_files_belong_to_their_distribution(env_prefix):
    prefix = env_prefix("py2-sklearn-dev")
    site_packages = "lib/python2.7/site-packages"
    owners = {}
    for record_path in (prefix / "conda-meta").glob("*.json"):
        record = json.loads(record_path.read_text())
        owners.update(dict.fromkeys(record["files"], record["name"]))
    assert owners[f"{site_packages}/numpy/__init__.pyc"] == "numpy"
    assert owners[f"{site_packages}/legacy_model.py"] == "legacy-model"
    assert owners[f"{site_packages}/legacy_model.pyc"] == "legacy-model"


def test_py2_sklearn_dev_relocates_with_conda_pack(env_prefix, tmp_path):
    prefix = env_prefix("py2-sklearn-dev")
    archive = tmp_path / "env.tar"  # uncompressed: packs in about 2 s
    conda_pack.pack(prefix=str(prefix), output=str(archive), format="tar")
    dest = tmp_path / ("a-much-longer-path-than-the-source-" * 3) / "py2"
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="tar")
    # conda-unpack is Python 3 code (f-strings): run it with ours.
    unpack = [sys.executable, dest / "bin" / "conda-unpack"]
    subprocess.run(unpack, check=True, env={"PATH": "/usr/bin:/bin"})
    check_py2_sklearn_env(dest)
    assert libpython(dest).is_relative_to(dest)


def test_no_distributed_lacks_distributed(prefixes):
    prefix = prefixes["no-distributed"]
    assert run_python(prefix, "import tabulate").returncode == 0
    proc = run_python(prefix, "import distributed")
    assert proc.returncode != 0
    assert "No module named 'distributed'" in proc.stderr


def test_venv_is_a_plain_venv(prefixes):
    prefix = prefixes["venv"]
    assert (prefix / "pyvenv.cfg").is_file()
    assert not (prefix / "conda-meta").exists()
    python = prefix / "bin" / "python"
    assert python.is_symlink()
    assert not python.resolve().is_relative_to(prefix)


def test_second_build_is_instant(prefixes):
    start = time.perf_counter()
    again = {name: build(name) for name in SPECS}
    assert time.perf_counter() - start < 0.5
    assert again == prefixes


def test_unknown_name_says_which_exist():
    with pytest.raises(fixtures.UnknownFixtureError, match="use one of base"):
        build("no-such-env")


def test_incomplete_env_is_rebuilt(tmp_path):
    prefix = tmp_path / "envs" / SPECS["py27"].dirname
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").write_text("left by a killed build")
    assert build("py27", root=tmp_path) == prefix
    assert run_python(prefix, "print(1)").stdout.strip() == "1"
    assert prefix.with_name(prefix.name + ".complete").is_file()


def test_concurrent_builds_build_once(tmp_path):
    env = dict(clean_environ(), ENVSHIP_FIXTURES_DIR=str(tmp_path))
    cwd = Path(fixtures.__file__).parent.parent
    argv = [sys.executable, "-m", "fixtures", "py27"]
    procs = [
        subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    lines = {out for out, _err in results}
    assert lines == {f"py27 {tmp_path / 'envs' / SPECS['py27'].dirname}\n"}
    built = sum(err.count("py27: built") for _out, err in results)
    assert built == 1
