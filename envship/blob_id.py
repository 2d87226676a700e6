"""What a blob's bytes hash to, so that a node binds them to an id before it keeps them.

An environment's archive is named by its *content id*: the xxh3-128 hash of
the tree it unpacks to (:class:`envship.archive.ContentHasher`), which a
node can compute by reading the archive once, without writing anything. A
thin pack is named by the xxh3-128 digest of its own bytes
(:func:`envship.archive.path_digest`). A piece table binds pieces to the
table's sender only; these functions bind the whole to the id that the
client asked for, so bytes offered under another environment's id are
refused before a node holds them as that environment.

This module knows nothing of nodes, transfer or Dask.
"""

from __future__ import annotations

import os

import xxhash
import zstandard

from .archive import (
    READ_SIZE,
    TAR_DIRECTORY,
    TAR_HARDLINK,
    TAR_REGULAR,
    TAR_SYMLINK,
    ContentHasher,
    path_digest,
)
from .archive_reader import CorruptArchive, ForwardReader, read_members

#: What reading a damaged archive raises.
UNREADABLE = (CorruptArchive, zstandard.ZstdError, EOFError, ValueError)


def content_id(path: str | os.PathLike) -> str:
    """The content id of the archive at ``path``, read as a node reads it.

    Decompressed to its end, so that zstandard checks its own checksum too.
    Raises what reading a damaged archive raises (:data:`UNREADABLE`).

    Examples
    --------
    >>> content_id(artifact.path) == artifact.id  # doctest: +SKIP
    True
    """
    hasher = ContentHasher()
    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f, read_size=READ_SIZE)
        reader = ForwardReader(raw)
        for member in read_members(reader):
            mode = member.mode & 0o7777
            if member.type in TAR_REGULAR:
                h, left = xxhash.xxh3_128(), member.size
                while left:
                    chunk = reader.read(min(left, READ_SIZE))
                    if not chunk:
                        raise EOFError(f"{member.name} is cut short")
                    h.update(chunk)
                    left -= len(chunk)
                hasher.add_file(member.name, mode, h.hexdigest())
            elif member.type == TAR_DIRECTORY:
                hasher.add_dir(member.name, mode)
            elif member.type == TAR_SYMLINK:
                hasher.add_symlink(member.name, member.linkname)
            elif member.type == TAR_HARDLINK:
                hasher.add_hardlink(member.name, member.linkname)
            else:
                raise CorruptArchive(f"{member.name}: an entry of type {member.type!r}")
        while raw.read(READ_SIZE):  # to the frame's end, where its checksum is
            pass
    return hasher.hexdigest()


def blob_id(path: str | os.PathLike, *, thin: bool) -> str:
    """The id the blob at ``path`` has: a thin pack's digest, an archive's content id.

    Raises what reading a damaged archive raises (:data:`UNREADABLE`).

    Examples
    --------
    >>> blob_id(artifact.path, thin=False) == artifact.id  # doctest: +SKIP
    True
    """
    return path_digest(path) if thin else content_id(path)
