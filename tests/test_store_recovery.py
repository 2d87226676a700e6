"""The local store's ways out: a damaged entry is listed, removed and replaced;
a damaged archive or table is found before it is reused, and a node's refusal
says whose copy is damaged. Real fixture environments, a real cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import envship
from envship.blob_id import content_id
from envship.client.deliver import which_side
from envship.client.store import (
    ArtifactStore,
    DamagedArtifactError,
    StoreRepairWarning,
)
from envship.errors import CorruptArchiveError, EnvshipError
from fixtures.cluster import local_cluster


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "envship.cli", *map(str, args)],
        capture_output=True,
        text=True,
    )


def flip(path: Path, offset: int) -> None:
    """Invert four bytes of ``path`` at ``offset`` (from its end if negative)."""
    with open(path, "r+b") as f:
        f.seek(offset, 0 if offset >= 0 else 2)
        at = f.tell()
        data = f.read(4)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture(scope="module")
def packed(env_prefix, tmp_path_factory):
    """A store holding base and venv, packed once; each test works on a copy."""
    root = tmp_path_factory.mktemp("packed") / "store"
    base = envship.pack(env_prefix("base"), name="base", store=root)
    venv = envship.pack(env_prefix("venv"), name="venv", store=root)
    return root, base, venv


@pytest.fixture
def copy(packed, tmp_path):
    root, base, venv = packed
    store = ArtifactStore(tmp_path / "store")
    shutil.copytree(root, store.root)
    return store, store.get(base.id), store.get(venv.id)


DAMAGE = {
    "cut short": lambda text: text[: len(text) // 3],
    "not JSON": lambda text: "\0\1garbage",
    "wrong fields": lambda text: json.dumps({**json.loads(text), "kind": "docker"}),
    "another id": lambda text: json.dumps({**json.loads(text), "id": "0" * 32}),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_manifest_is_listed_and_removed(copy, damage):
    store, base, venv = copy
    manifest = store.manifest_path(venv.id)
    manifest.write_text(DAMAGE[damage](manifest.read_text()))

    assert [a.id for a in store.artifacts()] == [base.id]
    [entry] = store.damaged()
    assert entry.id == venv.id and entry.names == ("venv",)
    assert entry.problem.startswith(f"its manifest {venv.id}.json")
    for name in ("venv", venv.id, venv.id[:8]):
        with pytest.raises(DamagedArtifactError, match=f"envship rm {venv.id}"):
            store.resolve(name)
    assert store.resolve("base") == base

    assert store.remove(venv.id) == entry
    assert not any(venv.id in p.name for p in store.root.rglob("*"))
    signatures = [p.read_text() for p in (store.root / "signatures").iterdir()]
    assert signatures == [base.id]
    assert store.artifacts() == [base] and store.damaged() == []


def test_damaged_manifest_from_the_command_line(copy, env_prefix):
    store, base, venv = copy
    manifest = store.manifest_path(venv.id)
    manifest.write_text(manifest.read_text()[:100])

    # Listed as damaged, with its id and what is wrong; the healthy one too.
    listing = cli("list", "--store", store.root)
    assert listing.returncode == 0, listing.stderr
    assert "base" in listing.stdout
    assert f"damaged: venv  {venv.id}  its manifest" in listing.stdout

    # inspect says so, with fixes that work (below: pack PATH; above: rm ID).
    shown = cli("inspect", "venv", "--store", store.root)
    assert shown.returncode == 1
    assert shown.stderr.startswith(
        f"error: environment 'venv': the entry {venv.id} of the store "
    )
    assert f"Fix: remove it (`envship rm {venv.id}`), or pack the environment " in (
        shown.stderr
    )
    assert cli("inspect", "base", "--store", store.root).returncode == 0

    # pack of its environment replaces it, saying so in one line.
    packed = cli("pack", env_prefix("venv"), "--name", "venv", "--store", store.root)
    assert packed.returncode == 0, packed.stderr
    assert packed.stderr.startswith(f"note: the store's entry of venv ({venv.id[:12]})")
    assert packed.stderr.count("\n") == 1
    assert store.damaged() == [] and {a.id for a in store.artifacts()} == {
        base.id,
        venv.id,
    }
    assert store.check_archive(store.get(venv.id)) is None

    # rm NAME of a healthy one, and rm ID of a damaged one, with another damaged.
    store.manifest_path(base.id).write_text("{")
    removed = cli("rm", "venv", "--store", store.root)
    assert removed.stdout == f"removed venv {venv.id}\n", removed.stderr
    removed = cli("rm", base.id, "--store", store.root)
    assert removed.stdout == f"removed the damaged entry {base.id}\n", removed.stderr
    assert store.ids() == [] and store.names() == {}


def test_files_without_a_manifest_are_a_damaged_entry(copy):
    store, base, venv = copy
    store.manifest_path(base.id).unlink()
    [entry] = store.damaged()
    assert entry.id == base.id and "is missing" in entry.problem
    assert store.remove(base.id).id == base.id
    assert not store.archive_path(base.id).exists()
    assert not store.table_path(base.id).exists()


def test_flipped_archive_is_packed_again(copy, env_prefix):
    store, base, venv = copy
    flip(base.path, base.path.stat().st_size // 2)
    artifact = store.get(base.id)
    assert "has digest" in store.check_archive(artifact)
    shown = cli("inspect", "base", "--store", store.root)
    assert shown.returncode == 0 and base.id in shown.stdout
    assert shown.stderr.startswith(f"damaged: its archive {base.id}.tar.zst has digest")
    assert f"Fix: `envship pack {env_prefix('base')}` writes it again" in shown.stderr

    packed = cli("pack", env_prefix("base"), "--name", "base", "--store", store.root)
    assert packed.returncode == 0, packed.stderr
    assert packed.stderr == (
        f"note: the archive of base ({base.id[:12]}) in your store was damaged "
        f"(its archive {base.id}.tar.zst has digest "
        + packed.stderr.split("has digest ")[1].split(",")[0]
        + f", not the {store._checks(base.id)['archive'][1]} written): "
        "writing it again\n"
    )
    assert store.check_archive(artifact) is None
    assert content_id(base.path) == base.id


def test_archive_of_an_older_envship_is_checked_by_its_content(copy):
    store, base, venv = copy
    path = store.manifest_path(venv.id)
    data = json.loads(path.read_text())
    del data["checks"]["archive"]
    path.write_text(json.dumps(data))
    artifact = store.get(venv.id)
    assert store.check_archive(artifact) is None  # read whole: sound, recorded
    assert store._checks(venv.id)["archive"][0] == venv.path.stat().st_size

    path.write_text(json.dumps(data))  # nothing recorded, again
    flip(venv.path, -1000)
    assert "does not read" in store.check_archive(artifact)

    # A table: read whole, it must hash to the id; then its digest is recorded.
    del data["checks"]["table"]
    path.write_text(json.dumps(data))
    assert store.check_table(venv.id) is None
    assert (
        store._checks(venv.id)["table"][0] == store.table_path(venv.id).stat().st_size
    )


@pytest.mark.parametrize("offset", [40, -40])
def test_flipped_table_is_found_and_packed_again(copy, env_prefix, offset):
    store, base, venv = copy
    flip(store.table_path(venv.id), offset)
    assert "its table" in store.check_table(venv.id)
    artifact = store.get(venv.id)
    assert artifact.table() is None  # never used to write an archive or thin pack

    with pytest.warns(StoreRepairWarning, match="was damaged .its table"):
        again = envship.pack(env_prefix("venv"), name="venv", store=store)
    assert again.id == venv.id and store.check_table(venv.id) is None
    assert store.check_archive(again) is None


def test_damaged_archive_and_table_name_the_pack_that_fixes_them(copy, env_prefix):
    store, base, venv = copy
    flip(venv.path, 100_000)
    flip(store.table_path(venv.id), -40)
    with pytest.warns(StoreRepairWarning), pytest.raises(DamagedArtifactError) as e:
        store.ensure_archive(store.get(venv.id))
    assert f"envship pack {env_prefix('venv')}" in str(e.value)


def test_node_refusal_of_a_sound_copy_blames_the_node(copy):
    store, base, venv = copy
    refusal = CorruptArchiveError("venv", "the archive is not a readable ...", "...")
    error = which_side(store.get(venv.id), {"tcp://10.0.0.7:4000": refusal}, {})
    assert str(error).startswith(
        "environment 'venv': node tcp://10.0.0.7:4000 refused a verified artifact: "
        "the archive is not a readable ..."
    )
    assert venv.path.exists()


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("cluster"), {"solo": 1}) as cluster:
        yield cluster


def test_switch_with_a_flipped_archive_writes_it_again(solo, store, env_prefix):
    client, caches = solo
    artifact = envship.pack(env_prefix("base"), name="base", store=store)
    flip(artifact.path, artifact.path.stat().st_size // 2)
    with pytest.warns(StoreRepairWarning, match="writing it again"):
        report = client.use_environment(env_prefix("base"))
    assert report.ok and {r.environment for r in report.values()} == {artifact.id}
    client.use_environment(None)


def test_switch_with_a_damaged_local_copy_says_it_is_local(solo, store, env_prefix):
    """Damaged before its digest was recorded (the cheap check passes): the
    node refuses it, the client reads its own copy and says it is to blame."""
    client, caches = solo
    artifact = envship.pack(env_prefix("venv"), store=store)
    flip(artifact.path, artifact.path.stat().st_size // 2)
    local = ArtifactStore(store)
    data = json.loads(local.manifest_path(artifact.id).read_text())
    data["checks"]["archive"] = [artifact.path.stat().st_size, content_digest(artifact)]
    local.manifest_path(artifact.id).write_text(json.dumps(data))

    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreRepairWarning)  # not found before
        with pytest.raises(EnvshipError) as e:
            client.use_environment(env_prefix("venv"))
    message = str(e.value)
    assert message.startswith(
        f"environment '{artifact.name}': your local copy of {artifact.id} is damaged ("
    )
    assert re.search(r"; node tcp://127\.0\.0\.1:\d+ refused it: ", message)
    assert message.endswith(
        f"Fix: re-pack with `envship pack {env_prefix('venv')}` (done automatically "
        "next time); no worker was restarted"
    )
    assert not artifact.path.exists()  # removed: written again next time

    report = client.use_environment(env_prefix("venv"))
    assert report.ok and {r.environment for r in report.values()} == {artifact.id}
    client.use_environment(None)


def content_digest(artifact) -> str:
    from envship.archive import path_digest

    return path_digest(artifact.path)
