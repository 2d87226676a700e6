"""Reading the artifact format: the tar stream :class:`~envship.archive.ArchiveWriter` writes.

The reader parses exactly that stream (POSIX ustar plus pax headers) and
nothing more, over a decompressing stream that only goes forward
(:class:`ForwardReader`, fed ahead by :class:`Prefetcher`). Entries it does
not write are still parsed, so that the extractor refuses them by name.

It checks that the stream is well formed (:class:`CorruptArchive` if not),
not that it is safe: :mod:`envship.node.extract` decides that. This module
knows nothing of conda, venvs, nodes or Dask.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .archive import BLOCK, READ_SIZE, TAR_DIRECTORY, TAR_REGULAR

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


_PAX = b"x"
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_ZERO_BLOCK = bytes(BLOCK)
_MAX_PAX = 1 << 20
#: Tar entry types envship never writes, named for the refusal.
TAR_SPECIAL = {
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
        if member.type in TAR_REGULAR:
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
    if kind == TAR_DIRECTORY:
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
            if member.type == TAR_DIRECTORY:
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
