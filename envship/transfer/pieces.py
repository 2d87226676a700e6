"""What a blob is made of on the wire: its piece table, the offer, the peers.

A blob (an environment's archive) travels in pieces of
``envship.transfer.piece-size`` bytes. Its :class:`PieceTable` lists the
xxh3-128 digest of every piece and is bound to the blob by its own digest. An
:class:`Offer` (id, name, manifest, table) comes from the client, directly or
through the scheduler's registry, never from a peer, so every piece is
verified on arrival whoever sent it.

Everything here that is built from another process's message is checked for
type and bounds first (``from_msg``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import TypeGuard

import dask.utils
import xxhash

from envship import config
from envship.ids import (
    ID_PATTERN,
    MAX_TEXT,
    Address,
    Digest,
    EnvId,
    check_address,
    check_id,
    check_site,
)
from envship.manifest import Manifest, ThinManifest, blob_manifest

#: Bounds on what a piece table may declare.
MIN_PIECE_SIZE = 64 * 1024
MAX_PIECE_SIZE = 64 * 1024 * 1024
MAX_BLOB_SIZE = 1 << 40


# -- the piece table ------------------------------------------------------------


@dataclass(frozen=True)
class PieceTable:
    """The size of a blob, its piece size and the digest of every piece.

    Examples
    --------
    >>> table = PieceTable.of_bytes(b"x" * 100_000, piece_size=65536)
    >>> table.count, table.span(1)
    (2, (65536, 34464))
    >>> PieceTable.from_msg(table.to_msg(), table.digest) == table
    True
    """

    size: int
    piece_size: int
    digests: tuple[str, ...]

    @classmethod
    def of_file(cls, path: str | os.PathLike, piece_size: int) -> PieceTable:
        digests = []
        with open(path, "rb") as f:
            while piece := f.read(piece_size):
                digests.append(xxhash.xxh3_128_hexdigest(piece))
        return cls(os.path.getsize(path), piece_size, tuple(digests))

    @classmethod
    def of_bytes(cls, data: bytes, piece_size: int) -> PieceTable:
        digests = tuple(
            xxhash.xxh3_128_hexdigest(data[i : i + piece_size])
            for i in range(0, len(data), piece_size)
        )
        return cls(len(data), piece_size, digests)

    @cached_property
    def digest(self) -> Digest:
        """xxh3-128 of the whole table: what binds it to the blob."""
        h = xxhash.xxh3_128(f"{self.size} {self.piece_size}\n".encode())
        for d in self.digests:
            h.update(d.encode())
        return Digest(h.hexdigest())

    @property
    def count(self) -> int:
        return len(self.digests)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index``."""
        offset = index * self.piece_size
        return offset, min(self.piece_size, self.size - offset)

    def verify(self, index: int, data: bytes) -> bool:
        return (
            len(data) == self.span(index)[1]
            and xxhash.xxh3_128_hexdigest(data) == self.digests[index]
        )

    def to_msg(self) -> dict:
        return {
            "size": self.size,
            "piece_size": self.piece_size,
            "digests": list(self.digests),
            "digest": self.digest,
        }

    @classmethod
    def from_msg(cls, msg, digest: str | None = None) -> PieceTable:
        """Check a table received from another process; ValueError if wrong."""
        if not isinstance(msg, dict):
            raise ValueError("a piece table must be a dict")
        size, piece_size, digests = (
            msg.get("size"),
            msg.get("piece_size"),
            msg.get("digests"),
        )
        if not int_in(size, 0, MAX_BLOB_SIZE):
            raise ValueError(f"blob size out of bounds: {size!r}")
        if not int_in(piece_size, MIN_PIECE_SIZE, MAX_PIECE_SIZE):
            raise ValueError(f"piece size out of bounds: {piece_size!r}")
        expected = -(-size // piece_size)
        if not isinstance(digests, list | tuple) or len(digests) != expected:
            raise ValueError(f"a blob of {size} bytes has {expected} pieces")
        if not all(isinstance(d, str) and ID_PATTERN.fullmatch(d) for d in digests):
            raise ValueError("piece digests must be 32 hex digits")
        table = cls(size, piece_size, tuple(digests))
        if table.digest != (digest if digest is not None else msg.get("digest")):
            raise ValueError("the piece table does not match its digest")
        return table


def int_in(value, low: int, high: int) -> TypeGuard[int]:
    """Whether ``value`` is an int (not a bool) from ``low`` to ``high``."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    )


def piece_size() -> int:
    """``envship.transfer.piece-size``, within the bounds every node accepts."""
    size = dask.utils.parse_bytes(config.get("transfer.piece-size"))
    return min(max(size, MIN_PIECE_SIZE), MAX_PIECE_SIZE)


@dataclass(frozen=True)
class Offer:
    """What a node needs to fetch and install a blob: from the client, or the registry.

    ``id`` is the environment's content id (checked again when it is
    unpacked); ``table`` binds every piece of the archive.
    """

    id: EnvId
    name: str
    manifest: Manifest | ThinManifest
    table: PieceTable

    @classmethod
    def of_artifact(cls, artifact) -> Offer:
        return cls(
            check_id(artifact.id),
            artifact.name,
            artifact.manifest,
            PieceTable.of_file(artifact.path, piece_size()),
        )

    def to_msg(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "manifest": self.manifest.to_dict(),
            "table": self.table.to_msg(),
        }

    @classmethod
    def from_msg(cls, msg) -> Offer:
        if not isinstance(msg, dict):
            raise ValueError("an offer must be a dict")
        name = msg.get("name")
        if not isinstance(name, str) or len(name) > MAX_TEXT:
            raise ValueError("an offer needs a name")
        manifest = blob_manifest(msg.get("manifest"))
        if manifest.id != msg.get("id"):
            raise ValueError("an offer needs the manifest of its id")
        return cls(
            check_id(msg.get("id")),
            name,
            manifest,
            PieceTable.from_msg(msg.get("table")),
        )


@dataclass(frozen=True)
class Peer:
    """A nanny to fetch from: its address and site label."""

    address: Address
    site: str | None = None

    @classmethod
    def from_msg(cls, msg) -> Peer:
        if not isinstance(msg, dict) or not isinstance(msg.get("address"), str):
            raise ValueError(f"not a peer: {msg!r:.200}")
        return cls(check_address(msg["address"], "a peer"), check_site(msg.get("site")))

    def to_msg(self) -> dict:
        return {"address": self.address, "site": self.site}


def check_index(index, table: PieceTable) -> None:
    if not int_in(index, 0, table.count - 1):
        raise ValueError(f"piece index out of bounds: {index!r}")
