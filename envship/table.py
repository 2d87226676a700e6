"""An environment's table of entries: its content id without its archive.

Packing is two steps. The *table pass* lists what the archive holds (every
entry's path, kind, mode, mtime and, for files, size and digest) and hashes
it into the content id, reading only the files whose stat changed since the
last pack of the same environment (:class:`TableWriter` with a digest
cache). The archive is written from the table only when something needs it
(:func:`write_archive`): ``envship pack``, a node that holds nothing. Nodes
that hold most files get a thin pack instead (:mod:`envship.thin`).

A node reports which files of a table it lacks from their *store keys*
(digest, mode, mtime: see :mod:`envship.node.filestore`), sent compactly by
:func:`encode_keys`.

This module knows nothing of conda, venvs, nodes or Dask.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections.abc import Iterable
from typing import BinaryIO, NamedTuple

import msgpack
import zstandard

from .archive import ArchiveWriter, ContentHasher, file_digest, path_digest

#: The kinds of a table's entries (``Entry.kind``), as saved tables and thin
#: packs store them.
ROW_FILE, ROW_DIR, ROW_SYMLINK, ROW_HARDLINK = "f", "d", "l", "h"

#: One file's store key on the wire: digest (16 bytes), mode, mtime (seconds).
_KEY = struct.Struct(">16sHq")
#: Most keys a node checks in one call (26 MiB); environments have far fewer files.
MAX_FILES = 1 << 20


class Entry(NamedTuple):
    """One entry of an environment, as its archive holds it.

    A file's bytes come from ``source`` (a path on the packing machine) or
    ``data`` (bytes conda-pack rewrote, such as ``conda-meta`` records). A
    tuple: a table of 12k entries is saved and loaded as rows.
    """

    kind: str
    path: str
    mode: int = 0
    mtime: int = 0
    size: int = 0
    digest: str = ""
    link: str = ""
    source: str | None = None
    data: bytes | None = None


class EntryTable:
    """The entries of an environment, in archive order, and its content id.

    Examples
    --------
    >>> entry = Entry(ROW_FILE, "a.txt", 0o644, 0, 3, file_digest(b"hi\\n"))
    >>> table = EntryTable([entry])
    >>> len(table.id), table.file_count, table.unpacked_size
    (32, 1, 3)
    """

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        hasher = ContentHasher()
        for e in entries:
            if e.kind == ROW_FILE:
                hasher.add_file(e.path, e.mode, e.digest)
            elif e.kind == ROW_DIR:
                hasher.add_dir(e.path, e.mode)
            elif e.kind == ROW_SYMLINK:
                hasher.add_symlink(e.path, e.link)
            else:
                hasher.add_hardlink(e.path, e.link)
        self.id = hasher.hexdigest()

    @functools.cached_property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == ROW_FILE]

    @functools.cached_property
    def keys(self) -> list[str]:
        """Each file's key in a node's file store (:func:`store_key`), as ``files``."""
        return [store_key(e.digest, e.mode, e.mtime) for e in self.files]

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def unpacked_size(self) -> int:
        return sum(e.size for e in self.files)

    def save(self, fileobj: BinaryIO) -> None:
        """Write the table (msgpack, zstandard), as :meth:`load` reads it."""
        rows = pack_msg(self.entries)
        fileobj.write(zstandard.ZstdCompressor(level=1).compress(rows))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EntryTable:
        with open(path, "rb") as f:
            rows = unpack_msg(zstandard.ZstdDecompressor().stream_reader(f).read())
        return cls([Entry(*row) for row in rows])


class TableWriter:
    """The table pass: conda-pack's archive interface, writing nothing.

    Takes ``add(source, target)`` and ``add_bytes(source, data, target)`` as
    :class:`~envship.archive.ArchiveWriter` does and makes the same decisions
    (modes, mtimes, hard links), so that :func:`write_archive` later writes
    exactly the archive that hashes to this table's id.

    Files added while ``keep_data`` is true are kept in memory rather than
    read again from their source later: conda-pack's own scripts, written to
    temporary files that it deletes right after adding them.

    Parameters
    ----------
    digests : dict, optional
        ``{source path: [size, mtime_ns, ino, ctime_ns, digest]}`` from earlier
        passes: a file whose stat is unchanged keeps its digest unread.
        Updated in place; ``seen`` lists the paths this pass looked up.

    Examples
    --------
    >>> writer = TableWriter()
    >>> writer.add_bytes(None, b"hello\\n", "greeting.txt")
    >>> writer.close().file_count
    1
    """

    def __init__(self, digests: dict | None = None):
        self.digests = {} if digests is None else digests
        self.keep_data = False
        self.entries: list[Entry] = []
        self.read_files = 0
        self.seen: set[str] = set()
        self._inodes: dict[tuple[int, int], str] = {}

    def add(self, source: str, target: str) -> None:
        st = os.lstat(source)
        mtime = int(st.st_mtime)
        if stat.S_ISLNK(st.st_mode):
            self.entries.append(
                Entry(ROW_SYMLINK, target, mtime=mtime, link=os.readlink(source))
            )
        elif stat.S_ISDIR(st.st_mode):
            self.entries.append(Entry(ROW_DIR, target, entry_mode(st), mtime))
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in self._inodes:
                link = self._inodes[inode]
                self.entries.append(Entry(ROW_HARDLINK, target, mtime=mtime, link=link))
                return
            if st.st_nlink > 1:
                self._inodes[inode] = target
            if self.keep_data:
                with open(source, "rb") as f:
                    self.add_bytes(source, f.read(), target)
                return
            digest = self._digest(source, st)
            self.entries.append(
                Entry(
                    ROW_FILE,
                    target,
                    entry_mode(st),
                    mtime,
                    st.st_size,
                    digest,
                    source=source,
                )
            )
        else:
            raise ValueError(f"{source}: not a file, directory or symlink")

    def add_bytes(self, source: str | None, data: bytes, target: str) -> None:
        st = os.lstat(source) if source is not None else None
        mode, mtime = (entry_mode(st), int(st.st_mtime)) if st else (0o644, 0)
        digest = file_digest(data)
        if (
            source is not None
            and st is not None
            and not self.keep_data
            and len(data) == st.st_size
        ):
            # conda-pack read it whole (files pip installed): unless it was
            # rewritten, the archive reads it again from the file, later.
            if self._digest(source, st) == digest:
                self.entries.append(
                    Entry(
                        ROW_FILE, target, mode, mtime, len(data), digest, source=source
                    )
                )
                return
        self.entries.append(
            Entry(ROW_FILE, target, mode, mtime, len(data), digest, data=data)
        )

    def _digest(self, source: str, st: os.stat_result) -> str:
        self.seen.add(source)
        seen = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        known = self.digests.get(source)
        if known is not None and known[:4] == seen:
            return known[4]
        digest = path_digest(source)
        self.read_files += 1
        self.digests[source] = [*seen, digest]
        return digest

    def close(self) -> EntryTable:
        return EntryTable(self.entries)


def write_archive(
    table: EntryTable,
    fileobj: BinaryIO,
    *,
    level: int = 3,
    threads: int = 0,
    on_file=None,
) -> ArchiveWriter:
    """Write the archive of ``table``.

    Every file is read again and checked against its digest in the table, so
    what is written always hashes to ``table.id``.

    Parameters
    ----------
    on_file : callable, optional
        Called with each file's size as it is written.

    Returns
    -------
    ArchiveWriter
        Closed; its ``summary`` says what was written.

    Raises
    ------
    OSError
        A file changed since the table pass (size or digest).
    """
    with ArchiveWriter(fileobj, level=level, threads=threads) as writer:
        for e in table.entries:
            if e.kind == ROW_DIR:
                writer.write_dir(e.path, e.mode, e.mtime)
            elif e.kind == ROW_SYMLINK:
                writer.write_symlink(e.path, e.link, e.mtime)
            elif e.kind == ROW_HARDLINK:
                writer.write_hardlink(e.path, e.link, e.mtime)
            else:
                if e.data is not None:
                    digest = writer.write_data(e.path, e.mode, e.mtime, e.data)
                elif e.source is not None:
                    digest = writer.write_file(
                        e.source, e.path, e.mode, e.mtime, e.size
                    )
                else:
                    raise ValueError(f"{e.path}: a file entry without data or source")
                if digest != e.digest:
                    raise OSError(f"{e.source or e.path} changed since it was packed")
                if on_file is not None:
                    on_file(e.size)
    return writer


def pack_msg(obj) -> bytes:
    """msgpack of ``obj``: bytes as bytes, paths that are not UTF-8 kept as they are."""
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


def unpack_msg(data: bytes):
    """What :func:`pack_msg` packed (lists for tuples)."""
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")


def store_key(digest: str, mode: int, mtime: float) -> str:
    """The node store's name for a file: content, mode as sealed, mtime.

    Examples
    --------
    >>> store_key("0" * 32, 0o755, 1)
    '00000000000000000000000000000000-555-1000000000'
    """
    sealed = mode & 0o7777 & ~0o222
    return f"{digest}-{sealed:o}-{int(mtime * 1e9)}"


def encode_keys(files: Iterable[Entry]) -> bytes:
    """The store keys of ``files``, 26 bytes each, for a node to check."""
    return b"".join(
        _KEY.pack(bytes.fromhex(e.digest), e.mode & 0o7777, e.mtime) for e in files
    )


def decode_keys(data: bytes) -> list[str]:
    """Store keys from :func:`encode_keys`; ValueError for anything else."""
    if not isinstance(data, bytes) or len(data) % _KEY.size:
        raise ValueError("keys must be bytes in 26-byte records")
    if len(data) // _KEY.size > MAX_FILES:
        raise ValueError(f"more than {MAX_FILES} keys")
    return [
        store_key(digest.hex(), mode, mtime)
        for digest, mode, mtime in _KEY.iter_unpack(data)
    ]


def encode_bits(flags: Iterable[bool]) -> bytes:
    """Booleans packed eight to a byte, first one in the lowest bit.

    Examples
    --------
    >>> encode_bits([True, False, True])
    b'\\x05'
    >>> decode_bits(b"\\x05", 3)
    [True, False, True]
    """
    flags = list(flags)
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def decode_bits(data: bytes, count: int) -> list[bool]:
    """The ``count`` booleans of :func:`encode_bits`."""
    if not isinstance(data, bytes) or len(data) != (count + 7) // 8:
        raise ValueError(f"expected {count} bits")
    return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(count)]


def entry_mode(st: os.stat_result) -> int:
    """The permission bits an entry records: no setuid, setgid or sticky bits
    (nodes refuse them anyway)."""
    return stat.S_IMODE(st.st_mode) & 0o777
