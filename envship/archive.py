"""The artifact format: a tar stream compressed with zstandard, and its content id.

The id of an environment is an xxh3-128 hash of what it unpacks to: the sorted
relative paths, the type and permission bits of each entry, symlink and hard
link targets and file bytes. Modification times, owners, the compression level
and the archive's own bytes do not enter it, so the same environment packed
twice, or on another day, gets the same id. The packer computes it while
writing; the node cache computes it again while reading and refuses an archive
whose id differs.

This module writes the format and computes ids;
:mod:`envship.archive_reader` reads it. It knows nothing of conda, venvs or Dask.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

import xxhash
import zstandard

# Content ids have their home in envship.ids; still importable from here.
from envship.ids import ID_PATTERN as ID_PATTERN
from envship.ids import check_id as check_id
from envship.ids import is_id as is_id

BLOCK = tarfile.BLOCKSIZE
#: The tar entry types envship writes (ustar ``typeflag``); a regular file
#: may also come as ``b"\0"`` from older writers.
TAR_FILE, TAR_DIRECTORY, TAR_SYMLINK, TAR_HARDLINK = (
    tarfile.REGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
)
TAR_REGULAR = (TAR_FILE, tarfile.AREGTYPE)
READ_SIZE = 1 << 20


class ContentHasher:
    """Accumulates entries and gives the content id of the whole tree.

    Entries may come in any order; the id sorts them by path.

    Examples
    --------
    >>> h = ContentHasher()
    >>> h.add_file("bin/tool", 0o755, file_digest(b"#!/bin/sh\\n"))
    >>> h.add_symlink("bin/alias", "tool")
    >>> len(h.hexdigest())
    32
    """

    def __init__(self) -> None:
        self._lines: dict[str, bytes] = {}

    def _add(self, path: str, kind: str, mode: int, link: str, digest: str) -> None:
        self._lines[path] = f"{path}\0{kind}\0{mode:o}\0{link}\0{digest}\n".encode(
            "utf-8", "surrogateescape"
        )

    def add_file(self, path: str, mode: int, digest: str) -> None:
        self._add(path, "f", mode & 0o7777, "", digest)

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, "l", 0, target, "")

    def add_hardlink(self, path: str, target: str) -> None:
        self._add(path, "h", 0, target, "")

    def add_dir(self, path: str, mode: int) -> None:
        self._add(path, "d", mode & 0o7777, "", "")

    def hexdigest(self) -> str:
        h = xxhash.xxh3_128()
        for path in sorted(self._lines):
            h.update(self._lines[path])
        return h.hexdigest()


def file_digest(data: bytes) -> str:
    """The digest of one file's bytes, as it enters the content id."""
    return xxhash.xxh3_128_hexdigest(data)


def path_digest(path: str | os.PathLike) -> str:
    """:func:`file_digest` of the file at ``path``, read in chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(READ_SIZE):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ContentSummary:
    """What an archive holds, known once it is fully written or read."""

    id: str
    file_count: int
    unpacked_size: int
    #: Files (and their bytes) linked from a node's file store, not written.
    linked_files: int = 0
    linked_bytes: int = 0


class ArchiveWriter:
    """Write entries into a zstandard-compressed tar and hash them on the way.

    Entries come with their metadata (``write_dir``, ``write_file`` ...), as
    :func:`envship.table.write_archive` replays a table of entries: the table
    pass decides what goes in, this class how it is stored.

    Parameters
    ----------
    fileobj : binary file
        Where the compressed stream goes. It is not closed.
    level : int
        zstandard compression level.
    threads : int
        Compression threads; 0 compresses in the calling thread.

    Examples
    --------
    >>> import io
    >>> out = io.BytesIO()
    >>> with ArchiveWriter(out) as archive:
    ...     digest = archive.write_data("greeting.txt", 0o644, 0, b"hello\\n")
    >>> archive.summary.file_count
    1
    """

    def __init__(self, fileobj: BinaryIO, *, level: int = 3, threads: int = 0):
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, write_checksum=True
        )
        self._stream = zstandard.ZstdCompressor(
            compression_params=params
        ).stream_writer(fileobj, closefd=False)
        self._hasher = ContentHasher()
        self._file_count = 0
        self._unpacked_size = 0
        self.summary: ContentSummary | None = None

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # The original error matters, not a second one from flushing.
            with contextlib.suppress(Exception):
                self._stream.close()

    def _write_header(self, info: tarfile.TarInfo) -> None:
        self._stream.write(
            _ustar_header(info)
            or info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        )

    def _pad(self, size: int) -> None:
        remainder = size % BLOCK
        if remainder:
            self._stream.write(b"\0" * (BLOCK - remainder))

    # Entries with their metadata given: envship.table decides what they are
    # (conda-pack's interface, modes, mtimes, hard links) and replays them here.

    def _entry(self, kind: bytes, target: str, mode: int, mtime: int, size: int = 0):
        info = tarfile.TarInfo(target)
        info.type, info.mode, info.mtime, info.size = kind, mode, mtime, size
        return info

    def write_dir(self, target: str, mode: int, mtime: int) -> None:
        self._write_header(self._entry(TAR_DIRECTORY, target, mode, mtime))
        self._hasher.add_dir(target, mode)

    def write_symlink(self, target: str, link: str, mtime: int) -> None:
        info = self._entry(TAR_SYMLINK, target, 0o777, mtime)
        info.linkname = link
        self._write_header(info)
        self._hasher.add_symlink(target, link)

    def write_hardlink(self, target: str, link: str, mtime: int) -> None:
        info = self._entry(TAR_HARDLINK, target, 0o644, mtime)
        info.linkname = link
        self._write_header(info)
        self._hasher.add_hardlink(target, link)

    def write_file(
        self, source: str, target: str, mode: int, mtime: int, size: int
    ) -> str:
        """Stream the file at ``source`` in, hashing it; its digest."""
        with open(source, "rb") as f:
            data = f.read(READ_SIZE)
            if len(data) < READ_SIZE:
                if len(data) != size:
                    raise OSError(f"{source} changed size since it was listed")
                return self.write_data(target, mode, mtime, data)
            # Large file: stream it, hashing as we go.
            self._write_header(self._entry(TAR_FILE, target, mode, mtime, size))
            digest = xxhash.xxh3_128()
            written = 0
            while data:
                digest.update(data)
                self._stream.write(data)
                written += len(data)
                data = f.read(min(READ_SIZE, size - written + 1))
                if written + len(data) > size:
                    raise OSError(f"{source} changed size since it was listed")
        if written != size:
            raise OSError(f"{source} changed size since it was listed")
        self._pad(written)
        self._count(target, mode, digest.hexdigest(), written)
        return digest.hexdigest()

    def write_data(self, target: str, mode: int, mtime: int, data: bytes) -> str:
        """Add ``data`` as the regular file ``target``; its digest."""
        self._write_header(self._entry(TAR_FILE, target, mode, mtime, len(data)))
        self._stream.write(data)
        self._pad(len(data))
        digest = file_digest(data)
        self._count(target, mode, digest, len(data))
        return digest

    def _count(self, target: str, mode: int, digest: str, size: int) -> None:
        self._hasher.add_file(target, mode, digest)
        self._file_count += 1
        self._unpacked_size += size

    def close(self) -> ContentSummary:
        """End the tar stream and the zstandard frame; return the summary."""
        if self.summary is None:
            self._stream.write(b"\0" * (2 * BLOCK))
            self._stream.close()
            self.summary = ContentSummary(
                self._hasher.hexdigest(),
                self._file_count,
                self._unpacked_size,
            )
        return self.summary


_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


def _ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """A plain ustar header, several times faster than ``TarInfo.tobuf``.

    None when the entry needs more than ustar offers (long names, huge
    files); the caller then lets tarfile write a pax header.
    """
    kind, mode, size, mtime = info.type, info.mode, info.size, info.mtime
    name = info.name.encode("utf-8", "surrogateescape")
    link = info.linkname.encode("utf-8", "surrogateescape")
    prefix = b""
    if len(name) > 100:
        cut = name.rfind(b"/", 0, 156)
        if cut <= 0 or len(name) - cut - 1 > 100:
            return None
        prefix, name = name[:cut], name[cut + 1 :]
    if len(link) > 100 or size >= 0o77777777777 or mtime < 0:
        return None
    header = bytearray(
        _USTAR.pack(
            name,
            b"%07o\0" % mode,
            b"0000000\0",
            b"0000000\0",
            b"%011o\0" % size,
            b"%011o\0" % int(mtime),
            b" " * 8,
            kind,
            link,
            b"ustar\x0000",
            b"",
            b"",
            b"",
            b"",
            prefix,
        )
    )
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)
