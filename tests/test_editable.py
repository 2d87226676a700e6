"""Editable installs ship their code: real ``pip install -e`` of setuptools and
hatchling projects, packed, shipped to a real cluster, edited, shipped again."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import envship
from envship.client import pack as pack_module
from envship.client.editable import find_projects
from envship.errors import EnvshipError
from envship.table import EntryTable
from fixtures.cluster import local_cluster
from fixtures.editable import editable_venv, install_editable, make_project

SITE = "lib/python3.11/site-packages"


@pytest.fixture(scope="module")
def dev(env_prefix, tmp_path_factory):
    """A venv with five editable projects: PEP 660 finder, src-layout and compat
    ``.pth`` (setuptools), ``.pth`` (hatchling), and a PEP 660 finder that
    ``uv pip install -e`` installed."""
    root = tmp_path_factory.mktemp("editable")
    venv = editable_venv(env_prefix("venv"), root / "dev-venv")
    projects = {
        "finderproj": make_project(root / "finder", "finderproj", "setuptools"),
        "srcproj": make_project(root / "src", "srcproj", "setuptools", 2, src=True),
        "compatproj": make_project(root / "compat", "compatproj", "setuptools", 3),
        "hatproj": make_project(root / "hat", "hatproj", "hatchling", 4),
        "uvproj": make_project(root / "uv", "uvproj", "setuptools", 5),
    }
    install_editable(venv, projects["finderproj"])
    install_editable(venv, projects["srcproj"])
    install_editable(venv, projects["compatproj"], "editable_mode=compat")
    install_editable(venv, projects["hatproj"])
    install_editable(venv, projects["uvproj"], installer="uv")
    return venv, projects


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_each_kind_of_hook_is_found(dev):
    venv, projects = dev
    site = venv / SITE
    found = {p.name: p for p in find_projects(site)}
    assert set(found) == set(projects)
    finder = found["finderproj"]
    assert finder.mapped == (
        ("finderproj", str(projects["finderproj"] / "finderproj")),
    )
    assert any(h.endswith("_finder.py") for h in finder.hooks)  # PEP 660
    assert (site / finder.hooks[0]).exists()
    by_uv = found["uvproj"]
    assert by_uv.mapped == (("uvproj", str(projects["uvproj"] / "uvproj")),)
    assert any(h.endswith("_finder.py") for h in by_uv.hooks)
    src = found["srcproj"]
    assert src.mapped == (("srcproj", str(projects["srcproj"] / "src" / "srcproj")),)
    for name in ("compatproj", "hatproj"):  # a folder in a .pth: the package only
        assert found[name].mapped == ((name, str(projects[name] / name)),)
        assert all(h.endswith(".pth") for h in found[name].hooks)
    shipped = [rel for _, rel in found["hatproj"].files()]
    assert shipped == ["hatproj/__init__.py", "hatproj/helpers.py"]


def test_pack_ships_the_code_not_the_hooks(dev, store):
    venv, projects = dev
    before = checksums(venv)
    artifact = envship.pack(venv, store=store, archive=False)
    paths = {e.path for e in EntryTable.load(artifact.table_path).entries}
    for name in projects:
        assert f"{SITE}/{name}/__init__.py" in paths
        assert f"{SITE}/{name}/helpers.py" in paths
        assert not any(p.startswith(f"{SITE}/{name}/__pycache__") for p in paths)
    top = [p.rsplit("/", 1)[-1] for p in paths if p.rsplit("/", 1)[0] == SITE]
    assert top and not [p for p in top if "editable" in p]
    cached = [p for p in paths if p.startswith(f"{SITE}/__pycache__/")]
    assert not [p for p in cached if "editable" in p]
    for junk in ("tests", "build", ".git", "src"):
        assert not any(p.startswith(f"{SITE}/{junk}/") for p in paths)
    # The client's environment is as it was: hooks and all.
    assert checksums(venv) == before
    assert list((venv / SITE).glob("__editable__.*.pth"))


def test_an_edit_changes_the_signature_and_one_file_is_read(dev, store):
    venv, projects = dev
    first = envship.pack(venv, store=store, archive=False)
    again = envship.pack(venv, store=store, archive=False)
    assert again.id == first.id
    helpers = projects["hatproj"] / "hatproj" / "helpers.py"
    original = helpers.read_text()
    try:
        helpers.write_text(original + "# edited\n")
        edited = envship.pack(venv, store=store, archive=False)
        assert edited.id != first.id
        assert edited.manifest.stats["files_read"] == 1
    finally:
        helpers.write_text(original)


def rows(artifact) -> list[tuple]:
    """The table of ``artifact`` as the archive and thin packs write it."""
    return [tuple(e[:7]) for e in EntryTable.load(artifact.table_path).entries]


def test_an_edit_of_the_code_alone_reuses_the_rest_of_the_table(
    dev, tmp_path, monkeypatch
):
    venv, projects = dev
    helpers = projects["srcproj"] / "src" / "srcproj" / "helpers.py"
    original = helpers.read_text()
    extra = venv / SITE / "extra_module.py"
    try:
        envship.pack(venv, store=tmp_path / "a", archive=False)
        helpers.write_text(original + "# edited\n")
        with monkeypatch.context() as m:
            # The environment's own table pass does not run: only the code's.
            m.setattr(pack_module, "_pack_venv", None)
            edited = envship.pack(venv, store=tmp_path / "a", archive=False)
        assert edited.manifest.stats["files_read"] == 1
        # What a process that never packed it makes of it: the same table.
        monkeypatch.setattr(pack_module, "_ENV_PARTS", {})
        fresh = envship.pack(venv, store=tmp_path / "b", archive=False)
        assert fresh.id == edited.id and rows(fresh) == rows(edited)
        # A change of the environment itself is seen: its table pass runs.
        extra.write_text("X = 1\n")
        changed = envship.pack(venv, store=tmp_path / "a", archive=False)
        assert f"{SITE}/extra_module.py" in {row[1] for row in rows(changed)}
    finally:
        helpers.write_text(original)
        extra.unlink(missing_ok=True)


def test_ignore_editable_ships_the_hooks_without_the_code(dev, store):
    venv, _ = dev
    artifact = envship.pack(venv, store=store, archive=False, ignore_editable=True)
    paths = {e.path for e in EntryTable.load(artifact.table_path).entries}
    assert f"{SITE}/hatproj/__init__.py" not in paths
    assert any(p.startswith(f"{SITE}/__editable__.") for p in paths)
    assert artifact.id != envship.pack(venv, store=store, archive=False).id


def test_a_conda_environment_ships_the_code_too(env_prefix, store, tmp_path):
    # conda-pack would refuse the editable install: envship handles it.
    env = tmp_path / "conda-dev"
    subprocess.run(["cp", "-a", env_prefix("no-distributed"), env], check=True)
    project = make_project(tmp_path / "proj", "condaproj", "setuptools")
    install_editable(env, project, isolated=True)
    before = checksums(env)
    first = envship.pack(env, store=store, archive=False)
    paths = {e.path for e in EntryTable.load(first.table_path).entries}
    assert f"{SITE}/condaproj/__init__.py" in paths
    assert not [p for p in paths if p.startswith(f"{SITE}/__editable__")]
    (project / "condaproj" / "helpers.py").write_text("def double(x):\n    pass\n")
    edited = envship.pack(env, store=store)  # the archive too: it is whole
    assert edited.id != first.id and edited.manifest.stats["files_read"] == 1
    assert checksums(env) == before


def test_legacy_egg_link_and_editables_redirector(tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    old = make_project(tmp_path / "old", "oldproj", "setuptools")
    (old / "oldproj.egg-info").mkdir()
    (old / "oldproj.egg-info" / "top_level.txt").write_text("oldproj\n")
    (site / "oldproj.egg-link").write_text(f"{old}\n.\n")
    (site / "easy-install.pth").write_text(f"/somewhere/else\n{old}\n")
    # hatchling's dev-mode-exact: the editables redirector, by hand.
    exact = make_project(tmp_path / "exact", "exactproj", "hatchling")
    info = site / "exactproj-0.1.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text(
        json.dumps({"url": f"file://{exact}", "dir_info": {"editable": True}})
    )
    (info / "RECORD").write_text(
        "_exactproj.pth,,\n_editable_impl_exactproj.py,,\nexactproj-0.1.dist-info/RECORD,,\n"
    )
    (site / "_exactproj.pth").write_text("import _editable_impl_exactproj\n")
    (site / "_editable_impl_exactproj.py").write_text(
        "from editables.redirector import RedirectingFinder as F\nF.install()\n"
        f"F.map_module('exactproj', {str(exact / 'exactproj' / '__init__.py')!r})\n"
    )
    found = {p.name: p for p in find_projects(site)}
    assert found["oldproj"].mapped == (("oldproj", str(old / "oldproj")),)
    assert found["oldproj"].hooks == ("oldproj.egg-link",)
    assert found["oldproj"].pth_lines == (("easy-install.pth", str(old)),)
    assert found["exactproj"].mapped == (("exactproj", str(exact / "exactproj")),)
    assert set(found["exactproj"].hooks) == {
        "_exactproj.pth",
        "_editable_impl_exactproj.py",
    }


def test_a_moved_checkout_is_refused_with_a_fix(env_prefix, store, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["cp", "-a", env_prefix("venv"), venv], check=True)
    site = venv / SITE
    (site / "__editable__.gone-0.1.pth").write_text(str(tmp_path / "gone") + "\n")
    info = site / "gone-0.1.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text(
        json.dumps({"url": "file:///gone", "dir_info": {"editable": True}})
    )
    (info / "RECORD").write_text("__editable__.gone-0.1.pth,,\n")
    with pytest.raises(EnvshipError, match="does not exist") as info_:
        envship.pack(venv, store=store, archive=False)
    assert "pip uninstall gone" in str(info_.value)
    assert envship.pack(venv, store=store, archive=False, ignore_editable=True).id


def worker_values(client) -> dict:
    """``{project: (VALUE, __file__)}`` as the one worker imports them."""
    # A lambda: sent by value (a module-level function would be sent by name).
    run = lambda: {  # noqa: E731
        name: (__import__(name).VALUE, __import__(name).__file__)
        for name in ("finderproj", "srcproj", "compatproj", "hatproj", "uvproj")
    }
    (values,) = client.run(run).values()
    return values


@pytest.mark.filterwarnings("ignore:dev-venv lacks numpy")
def test_workers_run_each_edit(dev, store, tmp_path):
    venv, projects = dev
    before = checksums(venv)
    # a setuptools project (PEP 660 finder) and a hatchling one (.pth)
    init = projects["finderproj"] / "finderproj" / "__init__.py"
    hat = projects["hatproj"] / "hatproj" / "__init__.py"
    originals = {init: init.read_text(), hat: hat.read_text()}
    try:
        with local_cluster(tmp_path / "cluster", {"node": 1}) as (client, caches):
            report = client.use_environment(venv)
            assert report.ok
            whole = report.transfer.client_bytes  # the whole environment
            values = worker_values(client)
            assert {k: v for k, (v, _) in values.items()} == {
                "finderproj": 1,
                "srcproj": 2,
                "compatproj": 3,
                "hatproj": 4,
                "uvproj": 5,
            }
            # The shipped copy, inside the node's cache, not the source folder.
            assert all(str(caches["node"]) in f for _, f in values.values())
            for value in (10, 11):
                init.write_text(f"VALUE = {value}\n")
                hat.write_text(f"VALUE = {value + 30}\n")
                report = client.use_environment(venv)
                assert report.ok
                # A thin pack (the edited files and the table), not the
                # environment; the node writes two files, links the rest.
                assert 0 < report.transfer.client_bytes < whole / 50
                written = sum(u["written"] for u in report.unpacked.values())
                assert written == 2
                values = worker_values(client)
                assert values["finderproj"][0] == value
                assert values["hatproj"][0] == value + 30
    finally:
        for path, text in originals.items():
            path.write_text(text)
    assert checksums(venv) == before
    assert os.path.exists(venv / SITE / "__editable__.finderproj-0.1.pth")
