"""envship.node.cache: real archives, real processes, real kills; no mocks."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from envship.client.store import ArtifactStore
from envship.errors import EnvshipError
from envship.manifest import Manifest
from envship.node.cache import EnvCache
from envship.node.extract import remove_tree
from envship.node.installer import MAX_RATIO
from envship.node.relocate import fixup_venv
from fixtures.trees import pack_tree

OLD_PREFIX = "/home/someone/envs/old-prefix"
BASE_PYTHON = os.path.realpath(sys.executable)
LAYOUT = {"archives", "tmp", "locks", "leases", "used", "installed", "files"}


def make_venv_tree(root, *, files=3, size=1000, base_python=BASE_PYTHON, seed=b""):
    """A venv-like tree as the packer leaves it, with .envship/unpack.json."""
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "site-packages" / "pkg").mkdir(parents=True)
    (root / ".envship").mkdir()
    (root / "pyvenv.cfg").write_text(f"home = {Path(base_python).parent}\n")
    (root / "bin" / "activate").write_text(f'VIRTUAL_ENV="{OLD_PREFIX}"\n')
    (root / "bin" / "tool").write_text(f"#!{OLD_PREFIX}/bin/python\nprint(1)\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "lib" / "site-packages" / "pkg" / "__init__.py").write_bytes(seed)
    for i in range(files):
        data = seed + os.urandom(size)
        (root / "lib" / "site-packages" / "pkg" / f"mod{i}.py").write_bytes(data)
    unpack = {
        "prefix": OLD_PREFIX,
        "text_files": ["bin/activate", "bin/tool"],
        "links": {"bin/python": base_python, "bin/python3": base_python},
    }
    (root / ".envship" / "unpack.json").write_text(json.dumps(unpack))


def make_artifact(tmp_path, name="demo", builder=make_venv_tree, kind="venv", **kw):
    """Build, pack and describe an environment: (id, archive path, manifest)."""
    src = tmp_path / f"src-{name}"
    builder(src, **kw)
    archive = tmp_path / f"{name}.tar.zst"
    summary = pack_tree(src, archive)
    manifest = Manifest(
        id=summary.id,
        name=name,
        kind=kind,
        python="3.11",
        file_count=summary.file_count,
        unpacked_size=summary.unpacked_size,
    )
    remove_tree(src)
    return summary.id, archive, manifest


def assert_read_only(tree):
    for folder, dirs, files in os.walk(tree):
        for name in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            st = os.lstat(name)
            if not stat.S_ISLNK(st.st_mode):
                assert not st.st_mode & 0o222, name


def assert_no_trace(cache, id):
    assert not cache.has(id)
    assert not cache.has_archive(id)
    assert not cache.archive_path(id).exists()
    assert not cache.manifest_path(id).exists()
    assert set(os.listdir(cache.root)) <= LAYOUT | {"installs.log"}
    for sub in ("archives", "tmp", "installed", "used", "leases", "files"):
        assert os.listdir(cache.root / sub) == [], sub
    assert cache.installs(id) == []


# -- install ---------------------------------------------------------------


def test_ensure_installs_fixes_up_and_seals(tmp_path):
    id, archive, manifest = make_artifact(tmp_path)
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    assert stat.S_IMODE(os.stat(cache.root).st_mode) == 0o700
    cache.add_archive(id, archive, manifest)
    assert cache.has_archive(id) and not cache.has(id)
    assert cache.manifest(id) == manifest

    stages = []
    prefix = cache.ensure(id, progress=lambda *a: stages.append(a))
    assert prefix == cache.path(id) == cache.root / id
    assert cache.has(id)
    assert stages[-1] == ("fixup", 1, 1)
    assert ("extract", manifest.unpacked_size, manifest.unpacked_size) in stages
    assert (prefix / "bin" / "activate").read_text() == f'VIRTUAL_ENV="{prefix}"\n'
    assert (prefix / "bin" / "tool").read_text().startswith(f"#!{prefix}/bin/python\n")
    assert os.readlink(prefix / "bin" / "python") == BASE_PYTHON
    out = subprocess.check_output([prefix / "bin" / "python", "-c", "print(6 * 7)"])
    assert out.strip() == b"42"
    assert_read_only(prefix)
    assert stat.S_IMODE(os.stat(prefix).st_mode) == 0o500
    assert os.listdir(cache.root / "tmp") == []

    (install,) = cache.installs(id)
    assert (
        install["files"] == 8
    )  # pyvenv.cfg, activate, tool, __init__, mod0-2, unpack.json
    assert cache.size() >= install["size"] + archive.stat().st_size

    assert cache.ensure(id) == prefix
    assert len(cache.installs(id)) == 1
    (entry,) = cache.entries()
    assert (entry.id, entry.name, entry.has_tree, entry.has_archive) == (
        id,
        "demo",
        True,
        True,
    )

    # Beyond the entry: the stored originals of the files the fix-up rewrote,
    # kept until the next eviction for thin packs that refer to them.
    def kept():
        files = (cache.root / "files").rglob("*")
        return [f for f in files if f.is_file() and os.stat(f).st_nlink == 1]

    assert kept()
    assert entry.size + sum(os.stat(f).st_blocks * 512 for f in kept()) == cache.size()
    cache.gc()
    assert kept() == [] and entry.size == cache.size()


def test_ensure_without_artifact_is_an_error(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    with pytest.raises(EnvshipError, match="has no artifact"):
        cache.ensure("0" * 32, env="ghost")


def test_bad_ids_are_refused(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size=10)
    bad_ids = ("../x", "archives", "ABC" * 10, "", "0" * 8, "0" * 16, "0" * 33)
    for bad in (*bad_ids, "0" * 32 + "\n", "\n" + "0" * 32, None, 5):
        with pytest.raises(ValueError):
            cache.path(bad)
    # The client's store knows ids by the same check.
    store = ArtifactStore(tmp_path / "store")
    assert store.resolve("0" * 32 + "\n") is None


def test_archive_writer_removes_partial_file_on_error(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    id = "1" * 32
    with pytest.raises(RuntimeError):
        with cache.archive_writer(id, None) as f:
            f.write(b"half")
            raise RuntimeError("connection lost")
    assert not cache.has_archive(id)
    assert os.listdir(cache.root / "tmp") == []


def _ensure_in_child(root, id, barrier, results):
    barrier.wait()
    prefix = EnvCache(root).ensure(id)
    complete = (prefix / "lib" / "site-packages" / "pkg" / "mod199.py").is_file()
    results.put((str(prefix), complete))


def test_four_processes_at_once_extract_once(tmp_path):
    id, archive, manifest = make_artifact(tmp_path, files=200, size=20_000)
    root = tmp_path / "cache"
    EnvCache(root, max_size="1 GB").add_archive(id, archive, manifest)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_ensure_in_child, args=(root, id, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got == [(str(root / id), True)] * 4
    assert len(EnvCache(root).installs(id)) == 1


def _install_then_hang(root, id, ready):
    def progress(stage, done, total):
        if stage == "fixup":
            ready.set()
            time.sleep(600)

    EnvCache(root).ensure(id, progress=progress)


def test_killed_install_is_cleaned_by_the_next(tmp_path):
    id, archive, manifest = make_artifact(tmp_path, files=50)
    root = tmp_path / "cache"
    cache = EnvCache(root, max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_install_then_hang, args=(root, id, ready))
    child.start()
    assert ready.wait(120)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    (leftover,) = os.listdir(root / "tmp")
    assert leftover.startswith(f"{id}-install-")
    assert not cache.has(id)

    prefix = cache.ensure(id)
    assert (prefix / "bin" / "activate").is_file()
    assert os.listdir(root / "tmp") == []
    assert len(cache.installs(id)) == 1


def test_fake_leftover_temp_dir_is_removed(tmp_path):
    id, archive, manifest = make_artifact(tmp_path)
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    stale = cache.root / "tmp" / f"{id}-install-stale"
    (stale / "lib").mkdir(parents=True)
    (stale / "lib" / "half.py").write_text("x")
    (stale / "lib").chmod(0o555)
    other = cache.root / "tmp" / f"{'f' * 32}-install-other"
    other.mkdir()
    cache.ensure(id)
    assert sorted(os.listdir(cache.root / "tmp")) == [other.name]
    cache.gc()  # nobody holds the other id's lock: its leftover goes too
    assert os.listdir(cache.root / "tmp") == []


# -- leases and eviction ---------------------------------------------------


def sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_tree_planted_in_the_cache_is_not_taken_as_installed(tmp_path):
    id, archive, manifest = make_artifact(tmp_path)
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    planted = cache.path(id)
    (planted / "bin").mkdir(parents=True)
    (planted / "bin" / "python").write_text("#!/bin/sh\necho planted\n")
    assert not cache.has(id)
    cache.add_archive(id, archive, manifest)
    prefix = cache.ensure(id)
    assert cache.has(id) and (prefix / "pyvenv.cfg").is_file()
    assert os.path.islink(prefix / "bin" / "python")  # the real tree, not the plant


@pytest.mark.parametrize("mode", [0o1777, 0o775, 0o757])
def test_a_cache_folder_others_may_write_is_refused(tmp_path, mode):
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(EnvshipError, match=f"may be written by other users.*{mode:o}"):
        EnvCache(root)
    assert os.listdir(root) == []


def test_lock_files_do_not_pile_up(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    for i in range(6):
        id, archive, manifest = make_artifact(tmp_path, f"env{i}", seed=bytes([i]))
        cache.add_archive(id, archive, manifest)
        cache.ensure(id)
        cache.fetch_lock(id).acquire()
        cache.fetch_lock(id).release()
    locks = os.listdir(cache.root / "locks")
    assert locks and all(re.fullmatch(r"[0-9a-f]{2}(\.fetch)?\.lock", n) for n in locks)


def test_abandoned_partial_downloads_count_and_expire(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    old, young, busy = "a" * 32, "b" * 32, "c" * 32
    paths = {}
    for id in (old, young, busy):
        paths[id] = cache.partial_path(id, "0" * 32)  # as transfer names it
        assert paths[id] == cache.root / "tmp" / f"{id}.{'0' * 16}.partial"
        paths[id].write_bytes(os.urandom(1 << 20))
    hours_ago = time.time() - 2 * 3600
    for id in (old, busy):
        os.utime(paths[id], (hours_ago, hours_ago))
    assert cache.size() >= 3 << 20  # within the budget, like any bytes
    lock = cache.fetch_lock(busy)  # a download of it is running
    lock.acquire()
    try:
        cache.evict()
    finally:
        lock.release()
    assert not paths[old].exists()  # nobody took it up for an hour
    assert paths[young].exists() and paths[busy].exists()


def test_lease_of_a_killed_process_is_dead(tmp_path):
    id, archive, manifest = make_artifact(tmp_path)
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    proc = sleeper()
    try:
        cache.ensure(id, lease_pid=proc.pid)
        assert cache.live_leases(id) == [proc.pid]
        assert cache.entries()[0].leases == (proc.pid,)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert cache.live_leases(id) == []
    assert os.listdir(cache.root / "leases" / id) == []


def test_reused_pid_does_not_keep_a_lease(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    id = "2" * 32
    cache.lease(id, os.getpid())
    assert cache.live_leases(id) == [os.getpid()]
    # The same PID, but a process that started a minute earlier: not us.
    lease_file = cache.root / "leases" / id / str(os.getpid())
    lease_file.write_text(repr(float(lease_file.read_text()) - 60))
    assert cache.live_leases(id) == []
    assert not lease_file.exists()
    cache.lease(id, os.getpid())
    cache.release(id, os.getpid())
    assert cache.live_leases(id) == []
    with pytest.raises(ValueError):
        cache.lease(id, 2**22 + 12345)  # beyond pid_max: never a process


def test_lru_eviction_keeps_leased_and_newest(tmp_path):
    root = tmp_path / "cache"
    artifacts = {
        name: make_artifact(tmp_path, name, files=2, size=200_000)
        for name in ("a", "b", "c")
    }
    big = EnvCache(root, max_size="1 GB")
    id_a, archive_a, manifest_a = artifacts["a"]
    big.add_archive(id_a, archive_a, manifest_a)
    big.ensure(id_a)
    one = big.size()
    cache = EnvCache(root, max_size=int(2.5 * one))
    for name in ("b", "c"):
        id, archive, manifest = artifacts[name]
        cache.add_archive(id, archive, manifest)
        cache.ensure(id)
    # a was used least recently: gone with its archive.
    assert not cache.has(id_a) and not cache.has_archive(id_a)
    id_b, id_c = artifacts["b"][0], artifacts["c"][0]
    assert cache.has(id_b) and cache.has(id_c)
    assert cache.size() <= cache.max_size

    # Now b is the least recently used, but leased: c goes instead.
    proc = sleeper()
    try:
        cache.lease(id_b, proc.pid)
        cache.ensure(id_c)  # c used after b
        cache.add_archive(id_a, archive_a, manifest_a)
        cache.ensure(id_a)
        assert cache.has(id_a) and cache.has(id_b) and not cache.has(id_c)
        assert [e.id for e in cache.entries()] == [id_b, id_a]
        # Not even a tiny budget evicts it.
        assert EnvCache(root, max_size=1).evict(keep=(id_a,)) == []
        assert cache.clear() == [id_a]
        assert cache.has(id_b)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Its process is gone: gc can evict it under a tiny budget.
    assert EnvCache(root, max_size=1).gc() == [id_b]
    assert cache.entries() == []
    assert os.listdir(root / "tmp") == []


def test_clear_once_released_and_size_accounting(tmp_path):
    id, archive, manifest = make_artifact(tmp_path)
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    cache.ensure(id, lease_pid=os.getpid())
    assert cache.size() > 0
    assert cache.clear() == []  # leased by this process
    cache.release(id, os.getpid())
    assert cache.clear() == [id]
    assert cache.size() == 0
    assert not cache.path(id).exists()
    assert os.listdir(cache.root / "tmp") == []


def test_max_size_from_config(tmp_path):
    import dask

    with dask.config.set({"envship.cache.max-size": "3 MiB"}):
        assert EnvCache(tmp_path / "c").max_size == 3 * 2**20
    assert EnvCache(tmp_path / "c", max_size=1234).max_size == 1234


# -- bad artifacts -----------------------------------------------------------


def forged(tmp_path, members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "forged.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path


def bad_unsafe(tmp_path):
    archive = forged(tmp_path, [("ok.txt", b"ok"), ("../evil", b"evil")])
    id = "3" * 32
    manifest = Manifest(id, "bad", "venv", "3.11", file_count=1, unpacked_size=6)
    return id, archive, manifest


def bad_mismatch(tmp_path):
    _, archive, manifest = make_artifact(tmp_path, "bad")
    id = "4" * 32  # claims to be another environment
    return id, archive, manifest.replace(id=id)


def bad_bomb(tmp_path):
    id, archive, manifest = make_artifact(tmp_path, "bad", size=100_000)
    return id, archive, manifest.replace(unpacked_size=1000)


def bad_fixup(tmp_path):
    return make_artifact(tmp_path, "bad", base_python="/nonexistent/bin/python3.99")


def bad_kind(tmp_path):
    # A venv whose manifest says conda: the node would run conda's fix-up and
    # start its worker as a conda environment.
    id, archive, manifest = make_artifact(tmp_path, "bad")
    return id, archive, manifest.replace(kind="conda")


def bad_file_count(tmp_path):
    id, archive, manifest = make_artifact(tmp_path, "bad")
    return id, archive, manifest.replace(file_count=manifest.file_count + 1)


def bad_honest_bomb(tmp_path):
    # 200 MB of zeros, its size declared honestly: bounded by the archive's
    # own size (a few KiB) times MAX_RATIO, so refused after about 1 MB.
    def zeros(root):
        make_venv_tree(root)
        with open(root / "lib" / "zeros.bin", "wb") as f:
            for _ in range(200):
                f.write(bytes(1 << 20))

    id, archive, manifest = make_artifact(tmp_path, "bad", builder=zeros)
    assert archive.stat().st_size * MAX_RATIO < 200 << 20
    return id, archive, manifest


def bad_over_budget(tmp_path):
    id, archive, manifest = make_artifact(tmp_path, "bad")
    return id, archive, manifest.replace(unpacked_size=1 << 43)  # 8 TiB


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (bad_unsafe, "unsafe entry '../evil'"),
        (bad_mismatch, "does not match its id"),
        (bad_bomb, "bomb"),
        (bad_fixup, "needs the base interpreter /nonexistent/bin/python3.99"),
        (bad_kind, "says it is a conda environment, but it holds a venv"),
        (bad_file_count, "declares 9 files, and it holds 8"),
        (bad_honest_bomb, "bytes it may unpack to: an archive bomb"),
        (bad_over_budget, "more than this node's cache budget"),
    ],
)
def test_bad_artifact_leaves_no_trace(tmp_path, make_bad, message):
    id, archive, manifest = make_bad(tmp_path)
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    with pytest.raises(EnvshipError, match=message) as excinfo:
        cache.ensure(id, lease_pid=os.getpid())
    assert excinfo.value.env == "bad"
    assert_no_trace(cache, id)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "cache" / "evil").exists()


def test_a_size_declared_evicts_nothing_before_it_verifies(tmp_path):
    cache = EnvCache(tmp_path / "cache", max_size="10 MB")
    id, archive, manifest = make_artifact(tmp_path, "unused")
    cache.add_archive(id, archive, manifest)
    cache.ensure(id)  # installed, no longer used by anyone
    # Four bytes that declare 9.5 MiB: honouring that would evict "unused".
    liar = tmp_path / "liar.tar.zst"
    liar.write_bytes(b"\x28\xb5\x2f\xfd")
    lie = manifest.replace(id="5" * 32, name="liar", unpacked_size=19 << 19)
    cache.add_archive(lie.id, liar, lie)
    with pytest.raises(EnvshipError, match="not a readable envship artifact"):
        cache.ensure(lie.id)
    assert cache.has(id)


def test_an_install_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    id, archive, manifest = make_artifact(tmp_path, "big", files=8, size=4 << 20)
    root = tmp_path / "small-disk"
    root.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", root], check=True
    )
    try:
        cache = EnvCache(root / "cache", max_size="1 GB")
        cache.add_archive(id, archive, manifest)  # 32 MB, incompressible
        with pytest.raises(EnvshipError, match="(?s)to spare.*free disk space"):
            cache.ensure(id)
        assert not cache.has(id) and cache.has_archive(id)  # kept: not its fault
        assert os.listdir(root / "cache" / "tmp") == []
    finally:
        subprocess.run(["umount", root], check=True)


def test_fixup_venv_refuses_odd_links(tmp_path):
    tree = tmp_path / "tree"
    make_venv_tree(tree)
    spec = json.loads((tree / ".envship" / "unpack.json").read_text())
    spec["links"] = {"lib/evil": BASE_PYTHON}
    (tree / ".envship" / "unpack.json").write_text(json.dumps(spec))
    with pytest.raises(EnvshipError, match="only bin/python"):
        fixup_venv(tree, tmp_path / "final", env="odd")
    spec["links"] = {}
    spec["text_files"] = ["../outside.txt"]
    (tree / ".envship" / "unpack.json").write_text(json.dumps(spec))
    with pytest.raises(EnvshipError, match="outside the environment"):
        fixup_venv(tree, tmp_path / "final", env="odd")


# -- conda fix-up ------------------------------------------------------------

PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3/placeholder_" + "p" * 120


def make_fake_conda_tree(root, records=None):
    """A minimal conda-pack output: a real python, conda-pack's own conda-unpack."""
    import conda_pack
    from conda_pack import core

    pack_dir = Path(conda_pack.__file__).parent
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "conda-meta").mkdir()
    (root / "conda-meta" / "history").write_text("")
    # A real interpreter; it finds its standard library where it was built.
    shutil.copy2(BASE_PYTHON, root / "bin" / "python3.11")
    (root / "bin" / "python").symlink_to("python3.11")
    (root / "etc" / "config.txt").write_text(f"prefix={PLACEHOLDER}\n")
    (root / "etc" / "config.txt").chmod(0o444)
    blob = b"\x00head" + PLACEHOLDER.encode() + b"/lib\x00tail"
    (root / "etc" / "blob.bin").write_bytes(blob)
    if records is None:
        records = [
            ("etc/config.txt", PLACEHOLDER, "text"),
            ("etc/blob.bin", PLACEHOLDER, "binary"),
        ]
    script = core._conda_unpack_template.format(
        shebang="#!/usr/bin/env python",
        prefix_records=",\n".join(repr(r) for r in records),
        prefixes_py=(pack_dir / "prefixes.py").read_text(),
        version=conda_pack.__version__,
    )
    (root / "bin" / "conda-unpack").write_text(script)
    (root / "bin" / "conda-unpack").chmod(0o755)
    shutil.copy(pack_dir / "_progress.py", root / "bin" / "conda_unpack_progress.py")


def test_conda_fixup_targets_the_final_prefix(tmp_path):
    id, archive, manifest = make_artifact(
        tmp_path, "fake-conda", builder=make_fake_conda_tree, kind="conda"
    )
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    prefix = cache.ensure(id)
    assert (prefix / "etc" / "config.txt").read_text() == f"prefix={prefix}\n"
    assert stat.S_IMODE(os.stat(prefix / "etc" / "config.txt").st_mode) == 0o444
    blob = (prefix / "etc" / "blob.bin").read_bytes()
    assert blob.startswith(b"\x00head" + str(prefix).encode() + b"/lib\x00")
    assert len(blob) == len(b"\x00head" + PLACEHOLDER.encode() + b"/lib\x00tail")
    # No bytecode written into the tree by the fix-up.
    assert not (prefix / "bin" / "__pycache__").exists()
    assert_read_only(prefix)


def test_conda_fixup_failure_is_reported_and_leaves_no_trace(tmp_path):
    id, archive, manifest = make_artifact(
        tmp_path,
        "bad",
        builder=make_fake_conda_tree,
        kind="conda",
        records=[("etc/missing.txt", PLACEHOLDER, "text")],
    )
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    with pytest.raises(EnvshipError, match="'etc/missing.txt', which it does not hold"):
        cache.ensure(id)
    assert_no_trace(cache, id)


@pytest.mark.parametrize(
    "records, problem",
    [
        ([("../../escape.txt", PLACEHOLDER, "text")], "outside the environment"),
        ([("/etc/passwd", PLACEHOLDER, "text")], "outside the environment"),
        ([("etc/config.txt", PLACEHOLDER, "exec")], "not one that conda-pack writes"),
        ("__import__('os').system('touch /tmp/envship-pwned')", "not one that"),
    ],
)
def test_conda_records_are_read_never_run_and_stay_inside(tmp_path, records, problem):
    def builder(root, **_):
        make_fake_conda_tree(root, records=[])
        script = root / "bin" / "conda-unpack"
        text = script.read_text()
        literal = records if isinstance(records, str) else repr(records)
        script.write_text(
            text.replace("_prefix_records = [\n\n]", f"_prefix_records = {literal}")
        )

    id, archive, manifest = make_artifact(
        tmp_path, "forged", builder=builder, kind="conda"
    )
    cache = EnvCache(tmp_path / "cache", max_size="1 GB")
    cache.add_archive(id, archive, manifest)
    with pytest.raises(EnvshipError, match=problem):
        cache.ensure(id)
    assert_no_trace(cache, id)
    assert not os.path.exists("/tmp/envship-pwned")
    assert not os.path.exists("/tmp/escape.txt")


@pytest.mark.parametrize(
    "fixture, code",
    [
        (
            "base",
            "import sys, distributed; print(sys.prefix); print(distributed.__file__)",
        ),
        # conda-pack's records applied to a Python 2 environment.
        ("py27", "import sys, json; print(sys.prefix); print(json.__file__)"),
        ("venv", "import sys, dask; print(sys.prefix); print(dask.__file__)"),
    ],
)
def test_packed_fixture_runs_at_its_final_prefix(tmp_path, fixture, code):
    """envship.pack of a genuine environment, installed by the cache, runs."""
    from envship import pack

    fixtures = pytest.importorskip("fixtures")
    source = fixtures.build(fixture)
    artifact = pack(source, name=fixture, store=tmp_path / "store")
    cache = EnvCache(tmp_path / "cache", max_size="10 GB")
    cache.add_archive(artifact.id, artifact.path, artifact.manifest)
    prefix = cache.ensure(artifact.id)
    out = subprocess.check_output(
        [prefix / "bin" / "python", "-s", "-c", code],
        env={"PATH": os.environ.get("PATH", "")},
        text=True,
    ).split()
    assert out[0] == str(prefix)
    assert out[1].startswith(str(prefix))
    if artifact.manifest.kind == "conda":
        # Files conda-unpack rewrote now name the final prefix, not the source.
        (sysconfig,) = prefix.glob("lib/python*/_sysconfigdata*.py")
        assert str(prefix) in sysconfig.read_text()
        assert str(source) not in sysconfig.read_text()
    else:
        assert str(prefix) in (prefix / "bin" / "activate").read_text()
    assert_read_only(prefix)
    # Big trees: don't leave them for pytest's own clean-up of old runs.
    cache.clear()
    remove_tree(tmp_path / "store")
