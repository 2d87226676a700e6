"""envship.node.extract: real trees round-trip; hand-made malicious archives are refused."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tarfile
import threading
import time

import pytest
import zstandard

from envship.archive import ContentHasher, file_digest
from envship.errors import EnvshipError, MissingStoreFileError, UnsafeArchiveError
from envship.node.extract import _make_dirs_writable, extract_archive, remove_tree
from envship.node.filestore import FileStore
from envship.thin import THIN_MAGIC
from fixtures.trees import pack_tree

MTIME = 1_600_000_000


def make_tree(root):
    """A small environment-like tree with every kind of entry envship ships."""
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "share" / "empty").mkdir(parents=True)
    (root / "bin" / "python3.11").write_bytes(b"\x7fELF fake interpreter")
    (root / "bin" / "python3.11").chmod(0o755)
    (root / "bin" / "python").symlink_to("python3.11")
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o750)
    (root / "lib" / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "lib" / "pkg" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(
        b"\xa7\r\r\n" + bytes(range(256))
    )
    os.utime(root / "lib" / "pkg" / "__init__.py", (MTIME, MTIME))
    (root / "lib" / "pkg" / "data.txt").write_text("read only\n")
    (root / "lib" / "pkg" / "data.txt").chmod(0o444)
    os.link(root / "lib" / "pkg" / "data.txt", root / "lib" / "pkg" / "same.txt")
    (root / "lib" / "libfoo.so.1").write_bytes(b"lib")
    (root / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
    (root / "lib" / "pkg-link").symlink_to("pkg")
    (root / "share" / "up").symlink_to("../lib/pkg/__init__.py")
    (root / "share" / "big.bin").write_bytes(os.urandom(5 << 20) + b"tail")
    (root / "share" / "empty.txt").write_bytes(b"")
    long_dir = root / ("d" * 90) / ("e" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / "ünïcode-ファイル.txt").write_text("unicode\n")
    (root / "share" / "locked").mkdir()
    (root / "share" / "locked" / "inside").write_text("inside\n")
    (root / "share" / "locked").chmod(0o555)
    os.utime(root / "share", (MTIME + 5, MTIME + 5))


def snapshot(root):
    """What matters of a tree: type, mode, mtime, bytes or target, per path."""
    result = {}
    inodes = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("l", os.readlink(path), int(st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                with open(path, "rb") as f:
                    data = f.read()
                group = inodes.setdefault(st.st_ino, len(inodes))
                result[rel] = (
                    "f",
                    stat.S_IMODE(st.st_mode),
                    int(st.st_mtime),
                    data,
                    group if st.st_nlink > 1 else None,
                )
    return result


@pytest.mark.parametrize("threads", [1, 4])
def test_round_trip_keeps_id_modes_mtimes_bytes_and_links(tmp_path, threads):
    src = tmp_path / "src"
    make_tree(src)
    archive = tmp_path / "env.tar.zst"
    summary = pack_tree(src, archive)
    dest = tmp_path / "dest"
    got = extract_archive(
        archive,
        dest,
        expected_id=summary.id,
        max_unpacked_bytes=summary.unpacked_size,
        env="round-trip",
        threads=threads,
    )
    assert got == summary
    before, after = snapshot(src), snapshot(dest)
    assert after.keys() == before.keys()
    for path in before:
        assert after[path] == before[path], path
    assert os.path.samefile(dest / "lib/pkg/data.txt", dest / "lib/pkg/same.txt")
    assert os.stat(dest / "lib/pkg/__init__.py").st_mtime == MTIME
    assert os.stat(dest / "share").st_mtime == MTIME + 5
    remove_tree(src)
    remove_tree(dest)
    assert not dest.exists()


def test_progress_is_reported(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    summary = pack_tree(src, tmp_path / "a.tar.zst")
    seen = []
    extract_archive(
        tmp_path / "a.tar.zst",
        tmp_path / "dest",
        expected_id=summary.id,
        max_unpacked_bytes=summary.unpacked_size,
        env="p",
        progress=lambda *args: seen.append(args),
    )
    assert seen[-1] == ("extract", summary.unpacked_size, summary.unpacked_size)
    remove_tree(src)


def test_dest_must_be_empty(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("")
    with pytest.raises(ValueError):
        extract_archive(
            tmp_path / "none.tar.zst",
            tmp_path / "dest",
            expected_id="0",
            max_unpacked_bytes=0,
            env="e",
        )


# -- hand-made archives ------------------------------------------------------


def entry(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.linkname = link
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    return info, data


def claimed_id(members):
    """The id these entries would hash to: what a forger would put in a manifest."""
    hasher = ContentHasher()
    for info, data in members:
        if info.isreg():
            hasher.add_file(info.name, info.mode, file_digest(data))
        elif info.issym():
            hasher.add_symlink(info.name, info.linkname)
        elif info.islnk():
            hasher.add_hardlink(info.name, info.linkname)
        elif info.isdir():
            hasher.add_dir(info.name, info.mode)
    return hasher.hexdigest()


def write_archive(path, members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return raw.getvalue()


THIN_KINDS = {
    tarfile.REGTYPE: "f",
    tarfile.DIRTYPE: "d",
    tarfile.SYMTYPE: "l",
    tarfile.LNKTYPE: "h",
}


def thin_pack(members) -> bytes:
    """``members`` as a thin pack (every file carried), written by hand as a forger would."""
    rows = [
        [THIN_KINDS[i.type], i.name, i.mode, i.mtime, len(d), "", i.linkname, i.isreg()]
        for i, d in members
    ]
    head = json.dumps(rows).encode()
    data = b"".join(d for i, d in members if i.isreg())
    return THIN_MAGIC + struct.pack(">Q", len(head)) + head + data


def extract_forged(tmp_path, members, limit=None, thin=False):
    archive = tmp_path / "forged.tar.zst"
    if thin:
        archive.write_bytes(zstandard.ZstdCompressor().compress(thin_pack(members)))
    else:
        write_archive(archive, members)
    (tmp_path / "work").mkdir(exist_ok=True)
    size = sum(len(d) for info, d in members if info.isreg())
    return extract_archive(
        archive,
        tmp_path / "work" / "dest",
        expected_id=claimed_id(members),
        max_unpacked_bytes=size if limit is None else limit,
        env="forged-env",
    )


def outside_untouched(tmp_path):
    """Only the archive and the (empty) work folder remain; nothing escaped."""
    assert sorted(os.listdir(tmp_path)) == ["forged.tar.zst", "work"]
    assert os.listdir(tmp_path / "work") == []


HARMLESS = [entry("ok/first.txt", data=b"fine\n")]

FORGERIES = {
    "parent-path": ("../evil", [entry("../evil", data=b"x")]),
    "nested-parent": ("ok/../../evil", [entry("ok/../../evil", data=b"x")]),
    "absolute": ("/tmp/evil-envship", [entry("/tmp/evil-envship", data=b"x")]),
    "dot": ("./x", [entry("./x", data=b"x")]),
    "escaping-symlink": (
        "lib/esc",
        [entry("lib/esc", tarfile.SYMTYPE, link="../../outside")],
    ),
    "absolute-symlink": (
        "lib/abs",
        [entry("lib/abs", tarfile.SYMTYPE, link="/etc")],
    ),
    "write-through-symlink": (
        "lib/sub/evil",
        [
            entry("lib/sub", tarfile.SYMTYPE, link="."),
            entry("lib/sub/evil", data=b"x"),
        ],
    ),
    "symlink-chain-climbs-out": (
        "climb",
        [
            entry("d/up", tarfile.SYMTYPE, link=".."),
            entry("climb", tarfile.SYMTYPE, link="d/up/../.."),
        ],
    ),
    "hardlink-outside": (
        "lib/hl",
        [entry("lib/hl", tarfile.LNKTYPE, link="../outside")],
    ),
    "hardlink-absolute": (
        "lib/hl",
        [entry("lib/hl", tarfile.LNKTYPE, link="/etc/passwd")],
    ),
    "hardlink-to-later": (
        "lib/hl",
        [
            entry("lib/hl", tarfile.LNKTYPE, link="lib/later"),
            entry("lib/later", data=b"x"),
        ],
    ),
    "hardlink-to-symlink": (
        "lib/hl",
        [
            entry("lib/s", tarfile.SYMTYPE, link="x"),
            entry("lib/hl", tarfile.LNKTYPE, link="lib/s"),
        ],
    ),
    "setuid": ("bin/su", [entry("bin/su", data=b"x", mode=0o4755)]),
    "setgid": ("bin/sg", [entry("bin/sg", data=b"x", mode=0o2755)]),
    "sticky-dir": ("tmp", [entry("tmp", tarfile.DIRTYPE, mode=0o1777)]),
    "fifo": ("run/fifo", [entry("run/fifo", tarfile.FIFOTYPE)]),
    "char-device": ("dev/null", [entry("dev/null", tarfile.CHRTYPE)]),
    "block-device": ("dev/sda", [entry("dev/sda", tarfile.BLKTYPE)]),
    "duplicate": (
        "lib/twice",
        [entry("lib/twice", data=b"a"), entry("lib/twice", data=b"b")],
    ),
    "file-over-dir": (
        "lib",
        [entry("lib/x", data=b"a"), entry("lib", data=b"b")],
    ),
}


# Each forgery as a tar and, where a thin pack can say it, as a thin pack
# (special files it cannot: see MALFORMED_THIN).
@pytest.mark.parametrize(
    "case, thin",
    [(case, False) for case in sorted(FORGERIES)]
    + [
        (case, True)
        for case, (_, bad) in sorted(FORGERIES.items())
        if all(info.type in THIN_KINDS for info, _ in bad)
    ],
)
def test_forged_archive_is_refused_and_leaves_nothing(tmp_path, case, thin):
    bad_name, bad = FORGERIES[case]
    (tmp_path / "work").mkdir()
    with pytest.raises(UnsafeArchiveError) as excinfo:
        extract_forged(tmp_path, HARMLESS + bad, thin=thin)
    message = str(excinfo.value)
    assert repr(bad_name) in message
    assert "forged-env" in message
    outside_untouched(tmp_path)
    assert not os.path.lexists("/tmp/evil-envship")


def _rows(*rows):
    head = json.dumps(list(rows)).encode()
    return THIN_MAGIC + struct.pack(">Q", len(head)) + head


GOOD_ROW = ["f", "ok/first.txt", 0o644, MTIME, 5, "", "", True]
MALFORMED_THIN = {
    "not-json": THIN_MAGIC + struct.pack(">Q", 5) + b"{nope",
    "table-past-the-end": THIN_MAGIC + struct.pack(">Q", 1 << 20) + b"[]",
    "huge-table": THIN_MAGIC + struct.pack(">Q", 1 << 40) + b"[]",
    "not-a-list": _rows()[:-2] + b"{}",
    "seven-fields": _rows(GOOD_ROW[:7]) + b"fine\n",
    "size-as-text": _rows(["f", "ok/a", 0o644, MTIME, "5", "", "", True]) + b"fine\n",
    "bool-as-mode": _rows(["f", "ok/a", True, MTIME, 5, "", "", True]) + b"fine\n",
    "negative-size": _rows(["f", "ok/a", 0o644, MTIME, -5, "", "", True]),
    "mode-too-big": _rows(["f", "ok/a", 0o17777, MTIME, 0, "", "", True]),
    "fifo-kind": _rows(["p", "run/fifo", 0o644, MTIME, 0, "", "", False]),
    "bad-reference": _rows(["f", "ok/a", 0o644, MTIME, 5, "../../x", "", False]),
    "folder-with-data": _rows(["d", "ok", 0o755, MTIME, 5, "", "", True]) + b"12345",
    "cut-short": _rows(GOOD_ROW) + b"fin",
    "data-after-the-end": _rows(GOOD_ROW) + b"fine\nmore",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_THIN))
def test_malformed_thin_pack_is_refused_and_leaves_nothing(tmp_path, case):
    archive = tmp_path / "forged.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(MALFORMED_THIN[case]))
    (tmp_path / "work").mkdir()
    with pytest.raises(EnvshipError, match="forged-env.*not a readable") as excinfo:
        extract_archive(
            archive,
            tmp_path / "work" / "dest",
            expected_id="0" * 32,
            max_unpacked_bytes=1 << 20,
            env="forged-env",
            files=FileStore(tmp_path / "work"),
        )
    assert not isinstance(excinfo.value, MissingStoreFileError)
    assert sorted(os.listdir(tmp_path / "work")) == ["files"]
    assert os.listdir(tmp_path / "work" / "files") == []


def test_a_thin_pack_without_a_file_store_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    digest = file_digest(b"fine\n")
    pack = _rows(["f", "ok/first.txt", 0o644, MTIME, 5, digest, "", False])
    archive = tmp_path / "forged.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(pack))
    hasher = ContentHasher()
    hasher.add_file("ok/first.txt", 0o644, digest)
    with pytest.raises(EnvshipError, match="no file store"):
        extract_archive(
            archive,
            tmp_path / "work" / "dest",
            expected_id=hasher.hexdigest(),
            max_unpacked_bytes=1 << 20,
            env="forged-env",
        )
    outside_untouched(tmp_path)


def test_bomb_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    members = HARMLESS + [entry("lib/zeros", data=bytes(10 << 20))]
    with pytest.raises(UnsafeArchiveError, match="zeros.*bomb"):
        extract_forged(tmp_path, members, limit=1 << 20)
    outside_untouched(tmp_path)


def test_refusals_leave_no_decompressing_thread_behind(tmp_path):
    (tmp_path / "work").mkdir()
    # Far more data after the refusal than the prefetcher buffers (8 MiB).
    members = HARMLESS + [entry("lib/zeros", data=bytes(64 << 20))]
    before = threading.active_count()
    for _ in range(5):
        with pytest.raises(UnsafeArchiveError, match="bomb"):
            extract_forged(tmp_path, members, limit=1 << 20)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_many_small_files_over_the_budget_are_a_bomb(tmp_path):
    (tmp_path / "work").mkdir()
    members = [entry(f"f{i}", data=bytes(1000)) for i in range(50)]
    with pytest.raises(UnsafeArchiveError, match="'f10'"):
        extract_forged(tmp_path, members, limit=10_500)
    outside_untouched(tmp_path)


def test_symlink_inside_is_fine(tmp_path):
    members = [
        entry("lib/libz.so.1", data=b"z"),
        entry("lib/libz.so", tarfile.SYMTYPE, link="libz.so.1"),
        entry("lib/up", tarfile.SYMTYPE, link="../lib/./libz.so.1"),
        entry("d/up", tarfile.SYMTYPE, link=".."),
        entry("d2/back", tarfile.SYMTYPE, link="../d/up/lib/../lib"),
        entry("dangling", tarfile.SYMTYPE, link="nowhere/yet"),
    ]
    summary = extract_forged(tmp_path, members)
    dest = tmp_path / "work" / "dest"
    assert summary.file_count == 1
    assert (dest / "lib" / "up").read_bytes() == b"z"
    assert os.readlink(dest / "dangling") == "nowhere/yet"


def test_one_changed_byte_is_an_id_mismatch(tmp_path):
    members = HARMLESS + [entry("lib/data", data=b"original content 12345")]
    archive = tmp_path / "forged.tar.zst"
    raw = write_archive(archive, members)
    assert raw.count(b"original content 12345") == 1
    archive.write_bytes(
        zstandard.ZstdCompressor().compress(
            raw.replace(b"original content 12345", b"original content 12346")
        )
    )
    (tmp_path / "work").mkdir()
    with pytest.raises(EnvshipError, match="does not match its id") as excinfo:
        extract_archive(
            archive,
            tmp_path / "work" / "dest",
            expected_id=claimed_id(members),
            max_unpacked_bytes=1000,
            env="forged-env",
        )
    assert not isinstance(excinfo.value, UnsafeArchiveError)
    assert "forged-env" in str(excinfo.value)
    outside_untouched(tmp_path)


def test_truncated_archive_is_an_error(tmp_path):
    members = [entry("lib/data", data=os.urandom(100_000))]
    archive = tmp_path / "forged.tar.zst"
    write_archive(archive, members)
    archive.write_bytes(archive.read_bytes()[:30_000])
    (tmp_path / "work").mkdir()
    with pytest.raises(EnvshipError, match="forged-env"):
        extract_archive(
            archive,
            tmp_path / "work" / "dest",
            expected_id=claimed_id(members),
            max_unpacked_bytes=100_000,
            env="forged-env",
        )
    outside_untouched(tmp_path)


def test_oversized_extended_header_is_refused(tmp_path):
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 32  # 4 GiB of "metadata" that never comes
    archive = tmp_path / "forged.tar.zst"
    raw = header.tobuf(tarfile.USTAR_FORMAT) + bytes(4096)
    archive.write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "work").mkdir()
    with pytest.raises(EnvshipError, match="claims 4294967296 bytes"):
        extract_archive(
            archive,
            tmp_path / "work" / "dest",
            expected_id="0" * 32,
            max_unpacked_bytes=100,
            env="forged-env",
        )
    outside_untouched(tmp_path)


def test_not_an_archive_is_an_error(tmp_path):
    archive = tmp_path / "forged.tar.zst"
    archive.write_bytes(b"this is not zstd at all" * 100)
    (tmp_path / "work").mkdir()
    with pytest.raises(EnvshipError, match="not a readable"):
        extract_archive(
            archive,
            tmp_path / "work" / "dest",
            expected_id="0" * 32,
            max_unpacked_bytes=100,
            env="forged-env",
        )
    outside_untouched(tmp_path)


def test_folders_are_made_writable_for_removal(tmp_path):
    # As root, rmtree never meets the PermissionError that triggers this.
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o555)
    for path in (tree / "a" / "b", tree / "a", tree):
        path.chmod(0o555)
    _make_dirs_writable(str(tree))
    for path in (tree / "a" / "b", tree / "a", tree):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "elsewhere").stat().st_mode) == 0o555


def test_remove_tree_handles_read_only_folders(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "link").symlink_to(tmp_path / "keep")
    (tmp_path / "keep").write_text("kept")
    for path in (tree / "a" / "b", tree / "a", tree):
        path.chmod(0o555)
    remove_tree(tree)
    assert not tree.exists()
    assert (tmp_path / "keep").read_text() == "kept"
    remove_tree(tree)  # missing: fine
