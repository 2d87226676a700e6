"""The node's file store: environments made of hard links, with real
environments packed by the real conda-pack and installed by the node cache."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import threading
from pathlib import Path

import dask.config
import pytest

import envship
from envship.node.cache import EnvCache, disk_usage


@pytest.fixture(scope="module")
def two_envs(env_prefix, tmp_path_factory):
    """The base fixture, and a copy of it with one more package (mtimes kept,
    as conda's hard links from its package cache keep them)."""
    folder = tmp_path_factory.mktemp("envs")
    base = env_prefix("base")
    derived = folder / "derived"
    subprocess.run(["cp", "-a", base, derived], check=True)
    site = next(derived.glob("lib/python3.*/site-packages"))
    (site / "extra_pkg").mkdir()
    (site / "extra_pkg" / "__init__.py").write_text("ANSWER = 42\n")
    store = tmp_path_factory.mktemp("store")
    return (
        envship.pack(base, store=store),
        envship.pack(derived, name="derived", store=store),
    )


def install(cache: EnvCache, artifact) -> dict:
    cache.add_archive(artifact.id, artifact.path, artifact.manifest)
    cache.ensure(artifact.id)
    (record,) = cache.installs(artifact.id)
    return record


def run_python(prefix, code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [prefix / "bin" / "python", *flags, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    )


def test_a_derived_environment_is_made_of_links(tmp_path, two_envs):
    base, derived = two_envs
    cache = EnvCache(tmp_path / "cache")
    first = install(cache, base)
    # Only files identical within the environment (empty __init__.py, ...).
    assert first["linked_files"] < 0.05 * first["files"]
    alone = disk_usage(cache.path(base.id))

    second = install(cache, derived)
    # Everything but the new package and the files fixed up for its prefix.
    assert second["linked_files"] >= 0.95 * second["files"]
    assert second["files"] - second["linked_files"] < 50
    trees = [cache.path(base.id), cache.path(derived.id), cache.root / "files"]
    assert disk_usage(*trees) <= 1.15 * alone

    # A linked file shares the inode of the other environment's file.
    module = "lib/python3.11/site-packages/dask/base.py"
    a, b = (os.stat(cache.path(i) / module) for i in (base.id, derived.id))
    assert a.st_ino == b.st_ino and a.st_nlink == 3
    assert not a.st_mode & 0o222

    # Both run; the derived one has its package; no import recompiles (a
    # .pyc whose source mtime differed would be "stale").
    for artifact in (base, derived):
        out = run_python(cache.path(artifact.id), "import dask, distributed", "-v")
        assert "bytecode is stale" not in out.stderr
        assert "code object from" in out.stderr
    out = run_python(
        cache.path(derived.id), "import extra_pkg; print(extra_pkg.ANSWER)"
    )
    assert out.stdout.strip() == "42"

    # The fix-ups wrote their prefix into private copies, never into the store.
    for artifact in (base, derived):
        for folder, _, files in os.walk(cache.root / "files"):
            for name in files:
                data = (cache.root / "files" / folder / name).read_bytes()
                assert os.fsencode(cache.path(artifact.id)) not in data
    fixed_up = [
        st.st_nlink
        for folder, _, files in os.walk(cache.path(derived.id))
        for name in files
        if not os.path.islink(path := os.path.join(folder, name))
        and os.fsencode(cache.path(derived.id)) in open(path, "rb").read()
        and (st := os.stat(path))
    ]
    assert fixed_up and set(fixed_up) == {1}

    # Own and shared bytes, as `envship cache list` shows them.
    entries = {e.id: e for e in cache.entries()}
    assert entries[base.id].shared > 0.9 * alone
    assert entries[derived.id].shared == entries[base.id].shared
    assert cache.size() <= 1.15 * alone + base.size + derived.size + 2 * 4096

    # Removing one keeps the other whole; the store drops what only it used.
    assert EnvCache(cache.root, max_size=1).evict(keep=(base.id,)) == [derived.id]
    assert os.stat(cache.path(base.id) / module).st_nlink == 2
    run_python(cache.path(base.id), "import dask, distributed")
    stored = [
        os.path.join(folder, name)
        for folder, _, files in os.walk(cache.root / "files")
        for name in files
    ]
    assert stored and all(os.stat(path).st_nlink >= 2 for path in stored)
    assert not [p for p in stored if open(p, "rb").read() == b"ANSWER = 42\n"]


@pytest.mark.parametrize("how", ["config", "filesystem"])
def test_without_hard_links_every_file_is_written(tmp_path, two_envs, how, caplog):
    base, _ = two_envs
    root = tmp_path / "cache"
    (root / "files").mkdir(parents=True)
    if how == "filesystem":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        # The store on another filesystem: every link fails with EXDEV.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", root / "files"],
            check=True,
        )
    try:
        with dask.config.set({"envship.cache.hard-links": how != "config"}):
            cache = EnvCache(root)
        with caplog.at_level(logging.WARNING, logger="envship.cache"):
            record = install(cache, base)
        assert record["linked_files"] == 0
        assert os.listdir(root / "files") == []
        run_python(cache.path(base.id), "import dask, distributed")
        module = cache.path(base.id) / "lib/python3.11/site-packages/dask/base.py"
        assert os.stat(module).st_nlink == 1 and not os.stat(module).st_mode & 0o222
        warned = [r for r in caplog.records if "hard links fail" in r.message]
        assert len(warned) == (1 if how == "filesystem" else 0)
    finally:
        if how == "filesystem":
            subprocess.run(["umount", root / "files"], check=True)


def test_concurrent_adds_where_links_fail_leave_no_folders(tmp_path):
    # The extractor enters files from several threads; when the first link
    # fails with EXDEV, the folders the others made must not stay behind.
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    from envship.node.filestore import FileStore

    (tmp_path / "files").mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tmp_path / "files"],
        check=True,
    )
    try:
        for trial in range(10):
            store = FileStore(tmp_path)
            paths = []
            for i in range(400):
                paths.append(tmp_path / f"{trial}-{i}")
                paths[-1].write_bytes(b"x")

            def add(first, store=store, paths=paths):
                for i in range(first, len(paths), 8):
                    store.add(f"{i % 16:02x}{i:030x}", str(paths[i]))

            threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not store.links
            assert os.listdir(tmp_path / "files") == []
    finally:
        subprocess.run(["umount", tmp_path / "files"], check=True)


def test_a_stored_file_is_never_changed_by_a_fixup(tmp_path):
    from envship.node.filestore import FileStore, unshare

    store = FileStore(tmp_path)
    path = tmp_path / "a.txt"
    path.write_bytes(b"/old/prefix here\n")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    key = store.key("0" * 32, 0o644, 1_700_000_000)
    store.add(key, str(path))
    assert (
        os.stat(path).st_nlink == 2 and not stat.S_IMODE(os.stat(path).st_mode) & 0o222
    )

    unshare(path)
    assert os.stat(path).st_nlink == 1
    assert os.stat(path).st_mtime == 1_700_000_000
    assert Path(store.path(key)).read_bytes() == b"/old/prefix here\n"
    assert store.gc() > 0 and not Path(store.path(key)).exists()


def test_a_twin_written_in_parallel_shares_the_stored_copy(tmp_path):
    # Two batches of one install (threads) may both find a key missing, both
    # write the file and both enter it: the second becomes a link to the
    # first's, so every copy of the content on the node is one inode (CI once
    # saw an empty __init__.py of a base stay apart from its thin pack's link).
    from envship.node.filestore import FileStore

    store = FileStore(tmp_path)
    key = store.key("0" * 32, 0o644, 1_700_000_000)
    first, second = tmp_path / "a" / "__init__.py", tmp_path / "b" / "__init__.py"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"")
        os.utime(path, (1_700_000_000, 1_700_000_000))
    store.add(key, str(first))
    store.add(key, str(second))
    assert (
        os.stat(first).st_ino
        == os.stat(second).st_ino
        == os.stat(store.path(key)).st_ino
    )
    assert sorted(os.listdir(second.parent)) == ["__init__.py"]  # no temporary left


def test_the_nannys_own_files_count_as_held_and_are_checked_when_copied(tmp_path):
    from envship.archive import file_digest
    from envship.node.filestore import FileStore
    from envship.node.own_files import OwnFiles

    when = 1_700_000_000
    own = tmp_path / "own-env" / "lib"
    own.mkdir(parents=True)
    texts = {"a.py": b"A = 1\n", "b.py": b"B = 2\n"}
    for name, data in texts.items():
        (own / name).write_bytes(data)
        os.utime(own / name, (when, when))
    (own / "alias.py").symlink_to("a.py")
    (own / "other.py").write_bytes(b"O = 0\n")  # an mtime no key asks for
    os.utime(own / "other.py", (when + 5, when + 5))
    store = FileStore(tmp_path, own=OwnFiles(own.parent, skip=tmp_path / "files"))
    key = {n: store.key(file_digest(d), 0o644, when) for n, d in texts.items()}
    absent = store.key(file_digest(b"C = 3\n"), 0o644, when)
    assert store.lacking([key["a.py"], key["b.py"], absent]) == [False, False, True]
    # Only files whose mode and mtime a key asks for are hashed, once.
    assert sorted(store.own._paths.values()) == [str(own / "a.py"), str(own / "b.py")]

    env = tmp_path / "env"
    env.mkdir()
    assert store.fill(key["a.py"], str(env / "a.py"))
    # A copy, entered in the store as any written file: read-only, the key's
    # mtime; the nanny's environment is left as it was.
    st, stored, source = (
        os.stat(p) for p in (env / "a.py", store.path(key["a.py"]), own / "a.py")
    )
    assert st.st_ino == stored.st_ino != source.st_ino
    assert (env / "a.py").read_bytes() == texts["a.py"]
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime == when
    assert stat.S_IMODE(source.st_mode) == 0o644 and source.st_nlink == 1

    # A file only the store holds (from another environment) is held, but
    # not for a thin pack without a base, which a node joining later fills
    # from its own environment alone.
    other = tmp_path / "other.txt"
    other.write_bytes(b"only in the store\n")
    os.utime(other, (when, when))
    stored_only = store.key(file_digest(other.read_bytes()), 0o644, when)
    store.add(stored_only, str(other))
    both = [key["a.py"], stored_only]
    assert store.lacking(both) == [False, False]
    assert store.lacking(both, own_only=True) == [False, True]

    # Changed since it was listed (same size and mtime): not used, nor listed again.
    (own / "b.py").write_bytes(b"B = 9\n")
    os.utime(own / "b.py", (when, when))
    assert not store.fill(key["b.py"], str(env / "b.py"))
    assert not (env / "b.py").exists()
    assert store.lacking([key["b.py"]]) == [True]


def test_a_file_swapped_for_a_fifo_or_a_symlink_is_not_read(tmp_path):
    # Listed as regular files, then replaced before they are hashed: neither
    # the FIFO nor the endless /dev/zero behind a symlink may hang the node.
    from envship.archive import file_digest
    from envship.node.own_files import OwnFiles

    when = 1_700_000_000
    own = tmp_path / "own-env"
    own.mkdir()
    for name in ("fifo.py", "zero.py", "kept.py"):
        (own / name).write_bytes(b"X = 1\n")
        os.utime(own / name, (when, when))
    files = OwnFiles(own)
    elsewhere = files.held(
        [f"{'0' * 32}-444-{(when + 9) * 10**9}"]
    )  # lists, hashes none
    assert elsewhere == [False]
    (own / "fifo.py").unlink()
    os.mkfifo(own / "fifo.py")
    (own / "zero.py").unlink()
    (own / "zero.py").symlink_to("/dev/zero")
    digest = file_digest(b"X = 1\n")
    key = f"{digest}-444-{when * 10**9}"
    assert files.held([key]) == [True]
    assert sorted(files._paths.values()) == [str(own / "kept.py")]
