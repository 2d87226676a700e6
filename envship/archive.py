"""The artifact format: a tar stream compressed with zstandard, and its content id.

The id of an environment is an xxh3-128 hash of what it unpacks to: the sorted
relative paths, the type and permission bits of each entry, symlink and hard
link targets and file bytes. Modification times, owners, the compression level
and the archive's own bytes do not enter it, so the same environment packed
twice, or on another day, gets the same id. The packer computes it while
writing; the node cache computes it again while reading and refuses an archive
whose id differs.

This module knows nothing of conda, venvs or Dask.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import xxhash
import zstandard

BLOCK = tarfile.BLOCKSIZE
READ_SIZE = 1 << 20
#: What a content id looks like (xxh3-128 today; longer hashes stay valid).
ID_PATTERN = re.compile(r"[0-9a-f]{16,128}")


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

    Offers ``add(source, target)`` and ``add_bytes(source, data, target)``, the
    interface conda-pack's ``Packer`` writes to, so conda-pack decides what goes
    in (and how prefixes are handled) while this class decides how it is stored.

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
    ...     archive.add_bytes(None, b"hello\\n", "greeting.txt")
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
        self._inodes: dict[tuple[int, int], str] = {}
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

    def _header(self, target: str, st: os.stat_result | None, size: int = 0):
        info = tarfile.TarInfo(target)
        if st is not None:
            # No setuid, setgid or sticky bits: nodes refuse them anyway.
            info.mode = stat.S_IMODE(st.st_mode) & 0o777
            info.mtime = int(st.st_mtime)
        else:
            info.mode = 0o644
            info.mtime = 0
        info.size = size
        return info

    def _write_header(self, info: tarfile.TarInfo) -> None:
        self._stream.write(
            _ustar_header(info)
            or info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        )

    def _pad(self, size: int) -> None:
        remainder = size % BLOCK
        if remainder:
            self._stream.write(b"\0" * (BLOCK - remainder))

    def add(self, source: str, target: str) -> None:
        """Add the file, symlink or directory at ``source`` as ``target``."""
        st = os.lstat(source)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            info = self._header(target, st)
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(source)
            self._write_header(info)
            self._hasher.add_symlink(target, info.linkname)
        elif stat.S_ISDIR(mode):
            info = self._header(target, st)
            info.type = tarfile.DIRTYPE
            self._write_header(info)
            self._hasher.add_dir(target, info.mode)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._inodes:
                info = self._header(target, st)
                info.type = tarfile.LNKTYPE
                info.linkname = self._inodes[key]
                self._write_header(info)
                self._hasher.add_hardlink(target, info.linkname)
                return
            if st.st_nlink > 1:
                self._inodes[key] = target
            self._add_regular(source, target, st)
        else:
            raise ValueError(f"{source}: not a file, directory or symlink")

    def _add_regular(self, source: str, target: str, st: os.stat_result) -> None:
        with open(source, "rb") as f:
            data = f.read(READ_SIZE)
            if len(data) < READ_SIZE:
                self._add_data(target, st, data)
                return
            # Large file: stream it, hashing as we go.
            info = self._header(target, st, st.st_size)
            self._write_header(info)
            digest = xxhash.xxh3_128()
            written = 0
            while data:
                digest.update(data)
                self._stream.write(data)
                written += len(data)
                data = f.read(READ_SIZE)
        if written != st.st_size:
            raise OSError(f"{source} changed size while being packed")
        self._pad(written)
        self._count(target, info.mode, digest.hexdigest(), written)

    def add_bytes(self, source: str | None, data: bytes, target: str) -> None:
        """Add ``data`` as the regular file ``target``, with the mode of ``source``."""
        st = os.lstat(source) if source is not None else None
        self._add_data(target, st, data)

    def _add_data(self, target: str, st: os.stat_result | None, data: bytes) -> None:
        info = self._header(target, st, len(data))
        self._write_header(info)
        self._stream.write(data)
        self._pad(len(data))
        self._count(target, info.mode, file_digest(data), len(data))

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
                self._hasher.hexdigest(), self._file_count, self._unpacked_size
            )
        return self.summary


_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


def _ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """A plain ustar header, several times faster than ``TarInfo.tobuf``.

    None when the entry needs more than ustar offers (long names, huge
    files); the caller then lets tarfile write a pax header.
    """
    name = info.name.encode("utf-8", "surrogateescape")
    link = info.linkname.encode("utf-8", "surrogateescape")
    prefix = b""
    if len(name) > 100:
        cut = name.rfind(b"/", 0, 156)
        if cut <= 0 or len(name) - cut - 1 > 100:
            return None
        prefix, name = name[:cut], name[cut + 1 :]
    if len(link) > 100 or info.size >= 0o77777777777 or info.mtime < 0:
        return None
    fields = [
        name,
        b"%07o\0" % info.mode,
        b"0000000\0",
        b"0000000\0",
        b"%011o\0" % info.size,
        b"%011o\0" % info.mtime,
        b" " * 8,
        info.type,
        link,
        b"ustar\x0000",
        b"",
        b"",
        b"",
        b"",
        prefix,
    ]
    header = bytearray(_USTAR.pack(*fields))
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def open_archive(fileobj: BinaryIO) -> tarfile.TarFile:
    """Open a compressed artifact for one streaming pass (``for info in tar``)."""
    reader = zstandard.ZstdDecompressor().stream_reader(fileobj, read_size=READ_SIZE)
    return tarfile.open(fileobj=reader, mode="r|")


def iter_members(
    fileobj: BinaryIO,
) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Yield ``(info, tar)`` for each member; read a file with ``tar.extractfile``."""
    with open_archive(fileobj) as tar:
        for info in tar:
            yield info, tar


def check_id(id: str) -> str:
    """``id`` if it is a content id (whole string, no newline); ValueError if not."""
    if not isinstance(id, str) or not ID_PATTERN.fullmatch(id):
        raise ValueError(f"not a content id: {id!r}")
    return id
