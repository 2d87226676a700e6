"""A thin pack's references against the unpack bound and the filesystem's
link limit (issue 19's review: 65,100 references in a 51 KiB pack wrote
260 MiB against a 5 MiB bound). Real files, a real file store on this
machine's disk, the real extraction.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from envship.errors import MissingStoreFileError, UnsafeArchiveError
from envship.node.extract import extract_archive
from envship.node.filestore import FileStore
from envship.table import ROW_FILE, Entry, EntryTable, file_digest
from envship.thin import write_thin_pack

DATA = os.urandom(4096)
MODE, MTIME = 0o444, 1_700_000_000


def stored_file(tmp_path: Path) -> tuple[FileStore, str]:
    """A file store holding one 4 KiB file; its key."""
    (tmp_path / "cache").mkdir()
    store = FileStore(tmp_path / "cache")
    path = tmp_path / "original"
    path.write_bytes(DATA)
    os.utime(path, (MTIME, MTIME))
    os.chmod(path, MODE)
    key = store.key(file_digest(DATA), MODE, MTIME)
    store.add(key, str(path))
    return store, key


def thin_pack(tmp_path: Path, count: int, size: int = len(DATA)) -> tuple[Path, str]:
    """A thin pack of ``count`` references to that file, each said to be ``size``."""
    digest = file_digest(DATA)
    entries = [
        Entry(ROW_FILE, f"f{i:06d}", MODE, MTIME, size, digest) for i in range(count)
    ]
    table = EntryTable(entries)
    out = io.BytesIO()
    write_thin_pack(table, out, refs={e.path for e in entries})
    path = tmp_path / "thin.tar.zst"
    path.write_bytes(out.getvalue())
    return path, table.id


def extract(pack: Path, tree: Path, id: str, store: FileStore, **limits):
    """The node's extraction of ``pack``, with a 1 MiB bound on bytes carried."""
    return extract_archive(
        pack,
        tree,
        expected_id=id,
        max_unpacked_bytes=1 << 20,
        env="thin",
        files=store,
        **limits,
    )


def test_references_count_against_the_bound(tmp_path):
    store, _ = stored_file(tmp_path)
    pack, id = thin_pack(tmp_path, 2_000)  # 8 MiB of references in a tiny pack
    assert pack.stat().st_size < 64 << 10
    with pytest.raises(UnsafeArchiveError, match="references and files come to more"):
        extract(pack, tmp_path / "tree", id, store)
    assert not (tmp_path / "tree").exists()
    # Within a bound that counts them, the same pack unpacks (links, no copies).
    summary = extract(pack, tmp_path / "tree", id, store, max_total_bytes=8 << 20)
    assert summary.linked_files == 2_000


def test_a_reference_that_lies_about_its_size_is_not_filled(tmp_path):
    store, _ = stored_file(tmp_path)
    pack, id = thin_pack(tmp_path, 3, size=1)
    with pytest.raises(MissingStoreFileError):
        extract(pack, tmp_path / "tree", id, store)


def test_a_stored_file_at_the_link_limit_is_copied_once_not_per_reference(tmp_path):
    store, key = stored_file(tmp_path)
    # ext4 allows 65,000 links to a file: bring the stored one near that.
    crowd = tmp_path / "crowd"
    crowd.mkdir()
    source = store.path(key)
    try:
        for i in range(70_000):
            os.link(source, crowd / str(i))
    except OSError as e:
        if e.errno != 31:  # EMLINK
            raise
    else:
        pytest.fail("this filesystem allows 70,000 links: no limit to test against")
    full = os.stat(source).st_ino
    pack, id = thin_pack(tmp_path, 100)
    tree = tmp_path / "tree"
    # One writer thread: two threads that meet the limit at the same moment
    # each copy once (at most one copy per thread, never one per reference).
    extract(pack, tree, id, store, max_total_bytes=100 * len(DATA), threads=1)
    inodes = {os.stat(p).st_ino for p in tree.iterdir()}
    # One copy, stored in place of the full file; every other reference links it.
    assert len(inodes) == 1 and full not in inodes
    assert os.stat(store.path(key)).st_ino in inodes
    assert all(p.read_bytes() == DATA for p in list(tree.iterdir())[:3])
