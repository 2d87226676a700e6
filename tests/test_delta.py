"""Edited environments: the table pass re-reads only changed files, thin packs
carry only what nodes lack, and what a node builds from one is still checked
against the environment's id. Real conda environments, a real node cache and,
at the end, a real cluster with a node that joins later."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import zstandard

import envship
from envship.archive_reader import ForwardReader
from envship.client import delta
from envship.client.store import ArtifactStore
from envship.errors import EnvshipError, MissingStoreFileError
from envship.node.cache import EnvCache, disk_usage
from envship.node.extract import extract_archive
from envship.table import store_key
from envship.thin import read_thin_pack
from fixtures.cluster import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NEW_MODULE = "tinypkg/__init__.py"


@pytest.fixture
def work_env(env_prefix, tmp_path) -> Path:
    """A copy of the base fixture that the test may edit."""
    dest = tmp_path / "work-env"
    subprocess.run(["cp", "-a", env_prefix("base"), dest], check=True)
    return dest


def site_packages(prefix: Path) -> Path:
    return next((prefix / "lib").glob("python3.*/site-packages"))


def add_package(prefix: Path, answer: int = 42) -> None:
    """What ``pip install`` of a tiny pure-Python package leaves behind."""
    package = site_packages(prefix) / "tinypkg"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(f"ANSWER = {answer}\n")


def thin_for(cache: EnvCache, base, edited) -> envship.client.store.Artifact:
    """The thin pack of ``edited`` against ``base`` for the node of ``cache``."""
    table = edited.table()
    base_keys = set(base.table().keys)
    keys = table.keys
    lacking = cache.files.lacking(keys)
    refs = {
        e.path
        for e, key, lacks in zip(table.files, keys, lacking, strict=True)
        if key in base_keys and not lacks
    }
    plan = delta.Plan(base=base, refs=refs, table=table)
    return delta.write_thin(edited, plan)


def install_base(cache: EnvCache, base) -> Path:
    cache.add_archive(base.id, base.path, base.manifest)
    return cache.ensure(base.id)


def run_in(prefix: Path, code: str) -> str:
    out = subprocess.run(
        [prefix / "bin" / "python", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def stale_pycs(prefix: Path) -> list[str]:
    """Sources whose ``.pyc`` python would not use: their mtime or size differ."""
    stale = []
    for pyc in prefix.rglob("__pycache__/*.pyc"):
        source = pyc.parent.parent / (pyc.name.split(".")[0] + ".py")
        if not source.is_file():
            continue
        header = pyc.read_bytes()[:16]
        if int.from_bytes(header[4:8], "little") & 1:
            continue  # hash-based: mtimes do not matter
        st = source.stat()
        if header[8:12] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") or (
            header[12:16] != (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
        ):
            stale.append(str(source))
    return stale


# -- the table pass --------------------------------------------------------------


def test_repack_reads_only_the_files_that_changed(env_prefix, store, tmp_path):
    work_venv = tmp_path / "work-venv"
    subprocess.run(["cp", "-a", env_prefix("venv"), work_venv], check=True)
    first = envship.pack(work_venv, store=store, archive=False)
    assert not first.has_archive and first.manifest.stats["files_read"] > 100

    victim = next(site_packages(work_venv).glob("*/__init__.py"))
    victim.write_text(victim.read_text() + "# edited\n")
    second = envship.pack(work_venv, store=store, archive=False)
    assert second.id != first.id
    assert second.manifest.stats["files_read"] == 1

    # The archive, written from the table when asked for, hashes to the id.
    written = ArtifactStore(store).ensure_archive(second)
    assert written.has_archive and written.size > 0
    summary = extract_archive(
        written.path,
        store.parent / "check",
        expected_id=second.id,
        max_unpacked_bytes=second.manifest.unpacked_size,
        env="check",
    )
    assert summary.file_count == second.manifest.file_count

    # Changed after the table pass: the archive is refused, not mislabelled.
    victim.write_text(victim.read_text() + "# once more\n")
    fresh = envship.pack(work_venv, store=store, name="late", archive=False)
    victim.write_text(victim.read_text() + "# and again\n")
    with pytest.raises(EnvshipError, match="changed since it was packed"):
        ArtifactStore(store).ensure_archive(fresh)


def test_a_table_of_another_format_is_ignored_not_fatal(work_env, store):
    # Stores written by an envship whose tables were JSON: such an artifact
    # has no usable table (it is shipped whole), and packing still works.
    first = envship.pack(work_env, store=store, archive=False)
    first.table_path.write_bytes(zstandard.ZstdCompressor().compress(b'[["d"]]'))
    stored = ArtifactStore(store).get(first.id)
    assert stored.table() is None
    add_package(work_env)
    assert envship.pack(work_env, store=store, archive=False).table() is not None


# -- thin packs on one node cache -------------------------------------------------


def test_a_thin_pack_links_everything_the_store_holds(work_env, store, tmp_path):
    base = envship.pack(work_env, store=store)
    cache = EnvCache(tmp_path / "cache")
    base_tree = install_base(cache, base)

    add_package(work_env)
    edited = envship.pack(work_env, store=store, archive=False)
    thin = thin_for(cache, base, edited)
    # The new module, conda-pack's conda-unpack and envship's unpack record.
    assert thin.manifest.files <= 4
    assert thin.size < base.size / 20

    cache.add_archive(thin.id, thin.path, thin.manifest)
    tree = cache.ensure(edited.id, via=thin.id)
    (record,) = cache.installs(edited.id)
    written = record["files"] - record["linked_files"]
    assert written == thin.manifest.files

    # Every other file is the base's file, one inode.
    shared = site_packages(base_tree).relative_to(base_tree)
    for path in (tree / shared).rglob("*.py"):
        if "tinypkg" in path.parts:
            continue
        twin = base_tree / path.relative_to(tree)
        assert os.stat(path).st_ino == os.stat(twin).st_ino, path

    # It runs, with the new package, and every .pyc stays valid.
    assert run_in(tree, "import tinypkg, json; print(tinypkg.ANSWER)") == "42"
    # Only files that the prefix fix-up rewrote (as in any unpacked copy).
    rewritten = {os.path.relpath(p, base_tree) for p in stale_pycs(base_tree)}
    assert len(rewritten) <= 3
    assert {os.path.relpath(p, tree) for p in stale_pycs(tree)} <= rewritten

    # Two environments on the node: little more than one.
    one = disk_usage(base_tree)
    both = disk_usage(base_tree, tree, cache.root / "files")
    assert both < 1.15 * one, (both, one)

    # Evicting the base leaves the edited one whole.
    EnvCache(cache.root, max_size=1).evict(keep=(edited.id,))
    assert not cache.has(base.id)
    assert run_in(tree, "import tinypkg, json, sqlite3; print(tinypkg.ANSWER)") == "42"


def flip_a_byte_of(thin_path: Path, member: str) -> None:
    """Change one byte of ``member``'s data inside the (compressed) thin pack."""
    raw = zstandard.ZstdDecompressor().stream_reader(open(thin_path, "rb")).read()
    reader = ForwardReader(io.BytesIO(raw))
    for m in read_thin_pack(reader):
        if m.name == member:
            assert m.size and m.digest is None  # carried, not a reference
            offset = reader.tell()
            break
    else:
        raise AssertionError(f"{member} is not in the thin pack")
    data = bytearray(raw)
    data[offset] ^= 1
    thin_path.write_bytes(zstandard.ZstdCompressor().compress(bytes(data)))


def edit_after_base(work_env, store, cache: EnvCache):
    """The base installed on the node; the edited environment and its thin pack."""
    base = envship.pack(work_env, store=store)
    install_base(cache, base)
    add_package(work_env)
    edited = envship.pack(work_env, store=store, archive=False)
    return base, edited, thin_for(cache, base, edited)


def test_one_changed_byte_in_a_thin_pack_is_caught(work_env, store, tmp_path):
    cache = EnvCache(tmp_path / "cache")
    base, edited, thin = edit_after_base(work_env, store, cache)
    flip_a_byte_of(
        thin.path, str(site_packages(work_env).relative_to(work_env) / NEW_MODULE)
    )

    cache.add_archive(thin.id, thin.path, thin.manifest)
    with pytest.raises(EnvshipError, match="does not match its id"):
        cache.ensure(edited.id, via=thin.id)
    assert not cache.has(edited.id)
    assert not cache.has_archive(thin.id)  # never tried again
    assert cache.has(base.id)


def test_a_file_changed_after_the_table_pass_is_not_sent(work_env, store, tmp_path):
    cache = EnvCache(tmp_path / "cache")
    base = envship.pack(work_env, store=store)
    install_base(cache, base)
    add_package(work_env)
    edited = envship.pack(work_env, store=store, archive=False)
    add_package(work_env, answer=43)  # same size, other bytes
    with pytest.raises(
        EnvshipError, match="(?s)changed since it was packed.*pack it again"
    ):
        thin_for(cache, base, edited)
    assert not list((store / "thin").glob("*")) and not list(store.glob(".tmp-*"))


def test_a_store_that_lost_a_file_asks_for_the_whole_archive(work_env, store, tmp_path):
    cache = EnvCache(tmp_path / "cache")
    base, edited, thin = edit_after_base(work_env, store, cache)
    cache.add_archive(thin.id, thin.path, thin.manifest)

    # Evicted, and with it the store files only it linked.
    assert EnvCache(cache.root, max_size=1).evict(keep=(thin.id,)) == [base.id]
    with pytest.raises(MissingStoreFileError, match="whole archive"):
        cache.ensure(edited.id, via=thin.id)
    assert not cache.has(edited.id)
    assert cache.has_archive(thin.id)  # sound: kept for peers


# -- on a cluster ------------------------------------------------------------------


def where_and_answer():
    import tinypkg

    return sys.prefix, tinypkg.ANSWER


def test_an_edited_environment_ships_only_new_files(work_env, store, tmp_path):
    with local_cluster(tmp_path / "c", {"a": 2, "b": 1}) as cluster:
        client, caches = cluster
        first = client.use_environment(work_env, progress=False)
        full = first.transfer.client_bytes

        add_package(work_env)
        report = client.use_environment(work_env, progress=False)
        edited = envship.pack(work_env, archive=False)
        assert report.ok
        assert report.transfer.client_bytes < full / 20
        assert len(report.unpacked) == 2  # one install per node
        assert not list((store / "thin").glob("*"))  # sent, then dropped
        for done in report.unpacked.values():
            assert 1 <= done["written"] <= 4
            assert done["linked"] > 1000
        answers = client.run(where_and_answer)
        assert {a for _, a in answers.values()} == {42}
        assert {os.path.basename(p) for p, _ in answers.values()} == {edited.id}

        # A node that joins later gets the base from its peers, then the thin pack.
        cluster.add_node("c", 1)
        client.wait_for_workers(4, timeout=120)
        answers = client.run(where_and_answer)
        assert {p for p, _ in answers.values()} >= {str(caches["c"] / edited.id)}
        cache = EnvCache(caches["c"])
        (record,) = cache.installs(edited.id)
        assert record["files"] - record["linked_files"] <= 4


def test_a_node_whose_store_lost_files_meanwhile_gets_the_whole_archive(
    work_env, store, tmp_path, monkeypatch
):
    with local_cluster(tmp_path / "c", {"a": 1}) as cluster:
        client, caches = cluster
        client.use_environment(work_env, progress=False)
        add_package(work_env)

        planned = delta.plan

        async def plan_then_lose_the_store(*args):
            plan = await planned(*args)
            assert plan.thin  # the node said it held nearly everything...
            # ...and an eviction empties its file store before the install.
            for path in (caches["a"] / "files").rglob("*"):
                if path.is_file():
                    path.unlink()
            return plan

        monkeypatch.setattr(delta, "plan", plan_then_lose_the_store)
        report = client.use_environment(work_env, progress=False)
        edited = envship.pack(work_env, archive=False)
        assert report.ok
        whole = ArtifactStore(store).get(edited.id).size  # written only for this
        assert report.transfer.client_bytes > 0.9 * whole
        (done,) = report.unpacked.values()
        assert done["written"] > 1000
        answers = client.run(where_and_answer)
        assert {(os.path.basename(p), a) for p, a in answers.values()} == {
            (edited.id, 42)
        }


def test_what_the_lacks_handler_reads_is_bounded():
    from envship.table import MAX_FILES, Entry, decode_bits, decode_keys, encode_keys

    files = [
        Entry("f", f"f{i}", 0o644, 1_700_000_000, 1, f"{i:032x}") for i in range(3)
    ]
    keys = decode_keys(encode_keys(files))
    assert keys == [store_key(e.digest, e.mode, e.mtime) for e in files]
    for lie in ["text", b"x" * 27, b"\0" * 26 * (MAX_FILES + 1), None]:
        with pytest.raises(ValueError):
            decode_keys(lie)
    with pytest.raises(ValueError):
        decode_bits(b"\0\0", 3)
