"""The thin pack format: an environment's table, and the data of files nodes lack.

A thin pack carries an environment to nodes that hold most of its files in
their file store already (see :mod:`envship.client.delta`). Inside one
zstandard frame it holds :data:`THIN_MAGIC`, the length of a JSON list of
rows, the rows (every entry in archive order: kind, path, mode, mtime, size,
digest, link target, carried), then the bytes of each carried file, one
after another. A file that is not carried is a *reference*: the node links
it from its store by digest, mode and mtime.

It unpacks to exactly what the environment's archive unpacks to and hashes
to the same content id: the node's extractor reads both (:func:`read_thin_pack`
yields the same :class:`~envship.archive_reader.Member` entries that
:func:`~envship.archive_reader.read_members` yields for a tar), so the checks on
names, links, sizes and the id are one. The rows list the digest of a
reference only; a carried file's digest is computed from its bytes.

Against a tar with a header per entry, a thin pack of 12k references costs
the node one JSON parse instead of 24k headers, and the client no tar at all.

This module knows nothing of conda, venvs, nodes or Dask.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import xxhash
import zstandard

from .archive import (
    READ_SIZE,
    TAR_DIRECTORY,
    TAR_FILE,
    TAR_HARDLINK,
    TAR_SYMLINK,
    file_digest,
    is_id,
)
from .archive_reader import (
    MAX_READ,
    CorruptArchive,
    ForwardReader,
    Member,
)
from .table import ROW_DIR, ROW_FILE, ROW_HARDLINK, ROW_SYMLINK, EntryTable

#: A thin pack's first bytes: no tar stream starts with a NUL (an empty name).
THIN_MAGIC = b"\0envship-thin-1\n"
_LENGTH = struct.Struct(">Q")
_TYPES = {ROW_DIR: TAR_DIRECTORY, ROW_SYMLINK: TAR_SYMLINK, ROW_HARDLINK: TAR_HARDLINK}


@dataclass(frozen=True)
class ThinSummary:
    """What a thin pack holds: files carried (and their bytes), references."""

    files: int
    size: int
    refs: int


def write_thin_pack(
    table: EntryTable,
    fileobj: BinaryIO,
    refs: Collection[str],
    *,
    level: int = 3,
    threads: int = 0,
) -> ThinSummary:
    """Write the thin pack of ``table`` in which the files in ``refs`` are references.

    Every carried file is read again and checked against its digest in the
    table, so what the node unpacks always hashes to ``table.id``.

    Parameters
    ----------
    refs : collection of str
        Paths of the files the receiving nodes hold (by digest, mode, mtime).
    level, threads : int
        zstandard's level and compression threads (0: the calling thread).

    Raises
    ------
    OSError
        A carried file changed since the table pass (size or digest).

    Examples
    --------
    >>> import io
    >>> from envship.table import Entry
    >>> digest = file_digest(b"hi\\n")
    >>> entry = Entry(ROW_FILE, "a.txt", 0o644, 0, 3, digest, data=b"hi\\n")
    >>> table = EntryTable([entry])
    >>> write_thin_pack(table, io.BytesIO(), refs={"a.txt"})
    ThinSummary(files=0, size=0, refs=1)
    """
    rows, carried, referred = [], [], 0
    for e in table.entries:
        if e.kind != ROW_FILE:
            rows.append([e.kind, e.path, e.mode, e.mtime, 0, "", e.link, False])
        elif e.path in refs:
            rows.append(
                [ROW_FILE, e.path, e.mode, e.mtime, e.size, e.digest, "", False]
            )
            referred += 1
        else:
            rows.append([ROW_FILE, e.path, e.mode, e.mtime, e.size, "", "", True])
            carried.append(e)
    head = json.dumps(rows, separators=(",", ":")).encode()
    compressor = zstandard.ZstdCompressor(level=level, threads=threads)
    with compressor.stream_writer(fileobj, closefd=False) as out:
        out.write(THIN_MAGIC + _LENGTH.pack(len(head)) + head)
        for e in carried:
            digest = _write_data(e, out) if e.data is None else _write_bytes(e, out)
            if digest != e.digest:
                raise OSError(f"{e.source or e.path} changed since it was packed")
    return ThinSummary(len(carried), sum(e.size for e in carried), referred)


def _write_bytes(e, out) -> str:
    out.write(e.data)
    return file_digest(e.data)


def _write_data(e, out) -> str:
    h = xxhash.xxh3_128()
    left = e.size
    with open(e.source, "rb") as f:
        while left:
            data = f.read(min(left, READ_SIZE))
            if not data:
                raise OSError(f"{e.source} changed since it was packed (shorter)")
            h.update(data)
            out.write(data)
            left -= len(data)
        if f.read(1):
            raise OSError(f"{e.source} changed since it was packed (longer)")
    return h.hexdigest()


def read_thin_pack(reader: ForwardReader) -> Iterator[Member]:
    """The entries of a thin pack, as :func:`~envship.archive_reader.read_members` yields them.

    References come as regular files with ``digest`` and ``ref_size`` set and
    no data. After each yield the stream is moved past the entry's data,
    however much of it the caller read.
    """
    head = reader.read(len(THIN_MAGIC) + _LENGTH.size)
    if len(head) < len(THIN_MAGIC) + _LENGTH.size or not head.startswith(THIN_MAGIC):
        raise CorruptArchive("not a thin pack")
    (length,) = _LENGTH.unpack_from(head, len(THIN_MAGIC))
    if length > MAX_READ:
        raise CorruptArchive(f"a thin pack whose table claims {length} bytes")
    data = reader.read(length)
    if len(data) < length:
        raise CorruptArchive("it ends inside the thin pack's table")
    try:
        rows = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CorruptArchive("a thin pack whose table is not JSON") from None
    if type(rows) is not list:
        raise CorruptArchive("a thin pack whose table is not a list")
    del data
    for row in rows:
        member = _member(row)
        start = reader.tell()
        yield member
        if member.size:
            reader.seek(start + member.size)
    if reader.read(1):
        raise CorruptArchive("data after the thin pack's last file")


def _member(row) -> Member:
    """One row as a :class:`Member`; CorruptArchive if any field is malformed."""
    if type(row) is not list or len(row) != 8:
        raise CorruptArchive("a thin pack row that is not a list of eight fields")
    kind, path, mode, mtime, size, digest, link, carried = row
    if (
        type(path) is not str
        or type(mode) is not int
        or type(mtime) not in (int, float)
        or type(size) is not int
        or type(digest) is not str
        or type(link) is not str
        or type(carried) is not bool
        or size < 0
        or not 0 <= mode <= 0o7777
    ):
        raise CorruptArchive(f"a thin pack row with a malformed field: {row!r:.200}")
    if kind == ROW_FILE:
        if carried:
            return Member(path, TAR_FILE, mode, size, mtime, "")
        if not is_id(digest):
            raise CorruptArchive(f"a reference to {path!r} without a valid digest")
        return Member(path, TAR_FILE, mode, 0, mtime, "", digest=digest, ref_size=size)
    if kind not in _TYPES or carried or size:
        raise CorruptArchive(f"a thin pack row of an unknown kind: {row!r:.200}")
    return Member(path, _TYPES[kind], mode, 0, mtime, link)
