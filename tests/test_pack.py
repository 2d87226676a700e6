"""Packing real environments: round trips, content ids, cache hits, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import envship
from envship.errors import EnvshipError
from envship.manifest import Manifest

ALL = [
    "base",
    "sklearn-dev",
    "py312",
    "py27",
    "py2-sklearn-dev",
    "no-distributed",
    "venv",
]
WITH_DISTRIBUTED = {"base", "sklearn-dev", "py312", "venv"}
PYTHON_2 = {"py27", "py2-sklearn-dev"}


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "envship.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )


def unpack(archive: Path, dest: Path, kind: str, python: Path | None = None) -> None:
    """Unpack with standard tools, then the fix-up a node does."""
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-I", "zstd", "-xf", archive, "-C", dest], check=True)
    if kind == "conda":
        subprocess.run(
            [python or dest / "bin" / "python", dest / "bin" / "conda-unpack"],
            check=True,
            env={"PATH": "/usr/bin:/bin"},
        )
    else:
        from envship.node.relocate import fixup_venv

        fixup_venv(dest, dest)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_to_a_longer_path(name, env_prefix, store, tmp_path):
    prefix = env_prefix(name)
    artifact = envship.pack(prefix, name=name, store=store)
    assert artifact.path.is_file()
    assert artifact.manifest.id == artifact.id
    assert artifact.manifest.name == name
    assert artifact.manifest.packed_size == artifact.path.stat().st_size

    dest = tmp_path / ("a-much-longer-path-than-the-source-" * 3) / name
    # conda-pack's conda-unpack is Python 3 code: run it with ours for Python 2.
    helper = Path(sys.executable) if name in PYTHON_2 else None
    unpack(artifact.path, dest, artifact.manifest.kind, helper)
    python = dest / "bin" / "python"
    if name in PYTHON_2:
        code = "import sys; print(sys.prefix); print(sys.version_info[0])"
        if name == "py2-sklearn-dev":
            code += "; import sklearn, legacy_model"
        out = subprocess.check_output([python, "-c", code], text=True).split()
        assert out == [str(dest), "2"]
        return
    code = "import sys; print(sys.prefix)"
    if name in WITH_DISTRIBUTED:
        code += "; import distributed; print(distributed.__file__)"
    out = subprocess.run(
        [python, "-s", "-c", code], capture_output=True, text=True, env={}
    )
    if name not in WITH_DISTRIBUTED:
        assert out.returncode == 0 and out.stdout.split() == [str(dest)]
        broken = subprocess.run([python, "-c", "import distributed"], env={})
        assert broken.returncode != 0
        return
    assert out.returncode == 0, out.stderr
    sys_prefix, distributed_file = out.stdout.split()
    assert sys_prefix == str(dest)
    assert distributed_file.startswith(str(dest))


def test_manifest_records_versions_and_platform(env_prefix, store):
    artifact = envship.pack(env_prefix("sklearn-dev"), store=store)
    m = artifact.manifest
    assert m.kind == "conda"
    assert m.python == "3.11.7"
    import dask
    import distributed

    assert m.packages["dask"] == dask.__version__
    assert m.packages["distributed"] == distributed.__version__
    assert "numpy" in m.packages
    assert m.platform["os"] == sys.platform
    assert m.file_count > 1000
    assert m.unpacked_size > m.packed_size > 0
    on_disk = json.loads(artifact.path.with_suffix("").with_suffix(".json").read_text())
    assert Manifest.from_dict(on_disk) == m


def test_same_environment_same_id_across_stores(env_prefix, tmp_path):
    prefix = env_prefix("base")
    first = envship.pack(prefix, store=tmp_path / "one")
    second = envship.pack(prefix, store=tmp_path / "two", level=1, threads=1)
    assert first.id == second.id
    # Another level gives other archive bytes but the same content id.
    assert first.path.read_bytes() != second.path.read_bytes()


def test_unchanged_environment_is_a_cache_hit(env_prefix, store):
    prefix = env_prefix("base")
    first = envship.pack(prefix, store=store)
    mtime = first.path.stat().st_mtime_ns
    again = envship.pack(prefix, name="again", store=store)
    assert again.id == first.id
    assert again.name == "again"
    assert first.path.stat().st_mtime_ns == mtime  # not rewritten
    names = envship.ArtifactStore(store).names()
    assert names == {prefix.name: first.id, "again": first.id}


def copy_env(prefix: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", prefix, dest], check=True)
    return dest


def test_one_changed_byte_changes_the_id(env_prefix, store, tmp_path):
    prefix = copy_env(env_prefix("venv"), tmp_path / "venv-copy")
    target = next((prefix / "lib").glob("python3.*/site-packages/tabulate/__init__.py"))
    before = envship.pack(prefix, store=store)
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    after = envship.pack(prefix, store=store)
    assert after.id != before.id
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    os.utime(target, ns=(0, 0))  # a changed mtime is a new signature, same id
    assert envship.pack(prefix, store=store).id == before.id


def test_conda_env_by_name(env_prefix, store, monkeypatch):
    prefix = env_prefix("no-distributed")
    monkeypatch.setenv("CONDA_ENVS_PATH", str(prefix.parent))
    artifact = envship.pack(prefix.name, store=store)
    assert artifact.manifest.source_prefix == str(prefix)
    # Names already in the store resolve when no environment has that name.
    monkeypatch.delenv("CONDA_ENVS_PATH")
    assert envship.pack(prefix.name, store=store).id == artifact.id


def test_cli_pack_list_inspect_rm(env_prefix, store):
    prefix = env_prefix("venv")
    out = run_cli("pack", prefix, "--name", "tools", "--store", store)
    assert out.returncode == 0, out.stderr
    # "packed tools <short id>", a sizes line, then the archive's path
    artifact_id = out.stdout.splitlines()[-1].rsplit("/", 1)[1].split(".")[0]
    assert out.stdout.split()[:3] == ["packed", "tools", artifact_id[:12]]
    listing = run_cli("list", "--store", store)
    assert "tools" in listing.stdout and artifact_id[:12] in listing.stdout
    manifest = json.loads(
        run_cli("inspect", "tools", "--json", "--store", store).stdout
    )
    assert manifest["id"] == artifact_id and manifest["kind"] == "venv"
    assert run_cli("rm", artifact_id[:8], "--store", store).returncode == 0
    assert not list(store.glob(f"{artifact_id}*"))
    assert "tools" not in run_cli("list", "--store", store).stdout


def assert_cli_error(result, *needles):
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: environment ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_cli_errors_without_tracebacks(env_prefix, store, tmp_path):
    assert_cli_error(run_cli("pack", tmp_path / "missing"), "does not exist")
    assert_cli_error(run_cli("pack", tmp_path), "neither a conda environment")
    (tmp_path / "nopython" / "conda-meta").mkdir(parents=True)
    assert_cli_error(run_cli("pack", tmp_path / "nopython"), "no Python in it")
    assert_cli_error(run_cli("pack", "no-such-env-anywhere"), "looked in", "Fix:")
    assert_cli_error(run_cli("inspect", "no-such-artifact"), "envship list")


def test_editable_installs_are_named(env_prefix, store, tmp_path):
    prefix = copy_env(env_prefix("venv"), tmp_path / "venv-editable")
    site = next((prefix / "lib").glob("python3.*/site-packages"))
    (site / "__editable__.mylib-0.1.pth").write_text(str(tmp_path / "src") + "\n")
    info = site / "mylib-0.1.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text(
        json.dumps({"url": "file:///src", "dir_info": {"editable": True}})
    )
    assert_cli_error(run_cli("pack", prefix), "editable", "mylib", "--ignore-editable")
    ok = run_cli("pack", prefix, "--ignore-editable", "--store", store)
    assert ok.returncode == 0, ok.stderr


def test_overwritten_conda_files_are_reported(env_prefix, store, tmp_path):
    prefix = copy_env(env_prefix("no-distributed"), tmp_path / "damaged")
    victim = next((prefix / "lib").glob("python3.*/site-packages/tabulate/__init__.py"))
    victim.unlink()
    assert_cli_error(run_cli("pack", prefix), "deleted/overwritten", "tabulate")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_full_disk_leaves_nothing_half_written(env_prefix, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", small], check=True
    )
    try:
        result = run_cli("pack", env_prefix("base"), "--store", small / "store")
        assert_cli_error(result, "full", "--store")
        # Only complete records may stay (the table pass fits in 2 MB): no
        # partial file, and no archive.
        leftovers = [p.name for p in (small / "store").rglob("*") if p.is_file()]
        assert not [n for n in leftovers if n.startswith(".tmp-")], leftovers
        assert not [n for n in leftovers if n.endswith(".tar.zst")], leftovers
    finally:
        subprocess.run(["umount", small], check=True)


def test_python_api_errors_are_envship_errors(store, tmp_path):
    with pytest.raises(EnvshipError) as info:
        envship.pack(tmp_path / "missing", store=store)
    assert "missing" in str(info.value) and "Fix:" in str(info.value)


def test_symlink_outside_the_environment_is_refused(env_prefix, store, tmp_path):
    prefix = copy_env(env_prefix("venv"), tmp_path / "venv-link")
    (prefix / "share").mkdir(exist_ok=True)
    os.symlink("/etc/hostname", prefix / "share" / "host")
    with pytest.raises(EnvshipError, match="outside the environment"):
        envship.pack(prefix, store=store)
    shutil.rmtree(prefix)


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "x" * 201])
def test_a_name_that_is_no_file_name_is_refused(env_prefix, store, name):
    with pytest.raises(EnvshipError, match="a name cannot hold"):
        envship.pack(env_prefix("base"), name=name, store=store)
    assert not (store.parent / "escaped").exists()
