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
import queue
import struct
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import xxhash
import zstandard

# Content ids have their home in envship.ids; still importable from here.
from envship.ids import ID_PATTERN as ID_PATTERN
from envship.ids import check_id as check_id
from envship.ids import is_id as is_id

BLOCK = tarfile.BLOCKSIZE
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
        self._write_header(self._entry(tarfile.DIRTYPE, target, mode, mtime))
        self._hasher.add_dir(target, mode)

    def write_symlink(self, target: str, link: str, mtime: int) -> None:
        info = self._entry(tarfile.SYMTYPE, target, 0o777, mtime)
        info.linkname = link
        self._write_header(info)
        self._hasher.add_symlink(target, link)

    def write_hardlink(self, target: str, link: str, mtime: int) -> None:
        info = self._entry(tarfile.LNKTYPE, target, 0o644, mtime)
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
            self._write_header(self._entry(tarfile.REGTYPE, target, mode, mtime, size))
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
        self._write_header(self._entry(tarfile.REGTYPE, target, mode, mtime, len(data)))
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
            b"%011o\0" % mtime,
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


# -- reading ------------------------------------------------------------------
# The reader sits next to the writer: it parses exactly the tar stream that
# ArchiveWriter writes, and nothing more.

# No single read is larger: a forged extended header can't claim gigabytes.
MAX_READ = 64 << 20


class ForwardReader:
    """A file over a decompressing stream: big reads in, forward seeks only.

    Headers are read 512 bytes at a time; buffering here avoids one call into
    the decompressor for each.
    """

    def __init__(self, raw) -> None:
        self._raw = raw
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of self._buf[0]

    def tell(self) -> int:
        return self._base + self._pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("unbounded reads are not supported")
        if size > MAX_READ:
            raise CorruptArchive(f"a read of {size} bytes was asked for")
        buf, pos = self._buf, self._pos
        end = pos + size
        if end <= len(buf):
            self._pos = end
            return buf[pos:end]
        parts = [buf[pos:]]
        have = len(buf) - pos
        self._base += len(buf)
        self._buf, self._pos = b"", 0
        while have < size:
            chunk = self._raw.read(max(READ_SIZE, size - have))
            if not chunk:
                break
            need = size - have
            if len(chunk) > need:
                # Keep the rest; self._base is already this chunk's offset.
                parts.append(chunk[:need])
                self._buf, self._pos = chunk, need
                break
            parts.append(chunk)
            have += len(chunk)
            self._base += len(chunk)
        return b"".join(parts)

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end), left to be read again."""
        data = self.read(size)
        self._base = self.tell() - len(data)
        self._buf, self._pos = data + self._buf[self._pos :], 0
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.tell()
        elif whence != os.SEEK_SET:
            raise OSError("only forward seeks are supported")
        skip = offset - self.tell()
        if skip < 0:
            raise OSError("only forward seeks are supported")
        while skip:
            got = len(self.read(min(skip, READ_SIZE)))
            if not got:
                break
            skip -= got
        return self.tell()


class Prefetcher:
    """Decompresses ahead in a thread (zstandard releases the GIL meanwhile).

    ``read`` returns the next chunk, whatever size is asked for; errors of
    the thread are raised there.
    """

    def __init__(self, raw, depth: int = 8) -> None:
        self._raw = raw
        self._chunks: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="envship-decompress", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                chunk = self._raw.read(READ_SIZE)
                if not self._put(chunk) or not chunk:
                    return
        except BaseException as e:  # handed to the reading thread
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1) -> bytes:
        if self._stop.is_set():
            return b""
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        if not item:
            self._stop.set()
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class CorruptArchive(Exception):
    """The stream is not a well-formed artifact (as opposed to an unsafe one)."""


@dataclass
class Member:
    """One tar entry, as far as extraction cares."""

    name: str
    type: bytes
    mode: int
    size: int
    mtime: float
    linkname: str
    #: A reference (thin packs, see ``envship.thin``): digest and size; no data.
    digest: str | None = None
    ref_size: int = 0


REGULAR = (b"0", b"\0")
DIRECTORY, SYMLINK, HARDLINK, _PAX = b"5", b"2", b"1", b"x"
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_ZERO_BLOCK = bytes(BLOCK)
_MAX_PAX = 1 << 20
SPECIAL = {
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a fifo",
    b"7": "a contiguous file",
    b"g": "a global pax header",
    b"L": "a GNU long name",
    b"K": "a GNU long link",
    b"S": "a sparse file",
}


def read_members(reader: ForwardReader) -> Iterator[Member]:
    """Parse the tar stream ``ArchiveWriter`` writes: POSIX ustar plus pax.

    Deliberately smaller than ``tarfile``: no global headers, GNU
    extensions, sparse maps or base-256 numbers, which envship never writes.
    Entries of those kinds are still yielded so that the caller refuses them
    by name. After each yield the stream is moved past the entry's data,
    however much of it the caller read.
    """
    while True:
        block = reader.read(BLOCK)
        if block == _ZERO_BLOCK:
            return
        member = _parse_header(block)
        if member.type == _PAX:
            pax = _read_pax(reader, member.size)
            member = _parse_header(reader.read(BLOCK))
            if member.type == _PAX:
                raise CorruptArchive(f"two pax headers in a row before {member.name!r}")
            _apply_pax(member, pax)
        start = reader.tell()
        yield member
        if member.type in REGULAR:
            reader.seek(start + _blocks(member.size))


def _parse_header(block: bytes) -> Member:
    if len(block) < BLOCK:
        raise CorruptArchive("it ends in the middle (no end-of-archive marker)")
    if block == _ZERO_BLOCK:
        raise CorruptArchive("an empty header where an entry should follow")
    (
        name,
        mode,
        _uid,
        _gid,
        size,
        mtime,
        checksum,
        kind,
        linkname,
        magic,
        version,
        _uname,
        _gname,
        _major,
        _minor,
        prefix,
    ) = _HEADER.unpack(block)
    if magic != b"ustar\0" or version != b"00":
        raise CorruptArchive("a header that is not POSIX ustar")
    stored = _octal(checksum, "checksum")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned:
        signed = sum(struct.unpack_from("148b8x356b", block)) + 8 * 32
        if stored != signed:
            raise CorruptArchive("a header with a wrong checksum")
    name = _text(name)
    if prefix[0]:
        name = _text(prefix) + "/" + name
    if kind == DIRECTORY:
        name = name.rstrip("/")
    return Member(
        name,
        kind,
        _octal(mode, "mode"),
        _octal(size, "size"),
        _octal(mtime, "mtime"),
        _text(linkname),
    )


def _octal(field: bytes, what: str) -> int:
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise CorruptArchive(f"a header whose {what} is not an octal number") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _blocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _read_pax(reader: ForwardReader, size: int) -> dict[str, bytes]:
    if size > _MAX_PAX:
        raise CorruptArchive(f"a pax header claims {size} bytes")
    data = reader.read(_blocks(size))[:size]
    if len(data) < size:
        raise CorruptArchive("it ends inside a pax header")
    records: dict[str, bytes] = {}
    pos = 0
    while pos < size:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptArchive("a malformed pax record") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > size or not record.endswith(b"\n"):
            raise CorruptArchive("a malformed pax record")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise CorruptArchive("a malformed pax record")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def _apply_pax(member: Member, pax: dict[str, bytes]) -> None:
    if any(key.startswith("GNU.sparse.") for key in pax):
        member.type = b"S"
    try:
        if "path" in pax:
            member.name = pax["path"].decode("utf-8", "surrogateescape")
            if member.type == DIRECTORY:
                member.name = member.name.rstrip("/")
        if "linkpath" in pax:
            member.linkname = pax["linkpath"].decode("utf-8", "surrogateescape")
        if "size" in pax:
            member.size = int(pax["size"])
        if "mtime" in pax:
            member.mtime = float(pax["mtime"])
    except (ValueError, UnicodeDecodeError):
        raise CorruptArchive(
            f"a pax header with a bad number for {member.name!r}"
        ) from None
