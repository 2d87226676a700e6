"""A nanny's side of transfers: receive pushes, serve pieces, answer who holds what.

:class:`BlobServer` is a :class:`.fetch.Fetcher` with the handlers the client
and peers call, installed on the nanny as ``envship_<name>``: ``offer``,
``put``, ``wait``, ``piece`` and ``have``. A piece is served as soon as it is
verified, from a download under way or from the complete archive in the node
cache, at most ``SERVE_SLOTS`` at once and within ``envship.transfer.max-rate``.

Every handler takes ids, digests, indices and bytes from other processes: each
is checked for type and bounds before anything is read, written or allocated.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import dask.utils
from dask.utils import format_bytes
from distributed.protocol import to_serialize

from envship import config
from envship.archive import check_id
from envship.errors import EnvshipError

from .fetch import HAVE_WAIT, Fetcher
from .pieces import (
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    Offer,
    PieceTable,
    _check_digest,
    _check_index,
    _int_in,
    _peers_from_msg,
    check_site,
)
from .store import BlobStore

#: Pieces a nanny serves at once; more requests are answered "busy".
SERVE_SLOTS = 6

_MISSING = {"missing": True}
_BUSY = {"busy": True}


class BlobServer(Fetcher):
    """A nanny's side of transfers: its downloads, and the handlers others call.

    Handlers (installed on the nanny as ``envship_<name>``): ``offer``,
    ``put``, ``wait``, ``piece`` and ``have``. Parameters: those of
    :class:`.fetch.Fetcher`.
    """

    def __init__(self, cache: BlobStore, rpc, address: str, site: str | None = None):
        super().__init__(cache, rpc, address, site)
        self._tables: dict[tuple[str, int, int], PieceTable] = {}
        self._serving = 0
        self._limit = _RateLimit(_parse_rate(config.get("transfer.max-rate")))

    # -- handlers ----------------------------------------------------------------

    async def offer(
        self, offer: dict, peers: list | None = None, seed_site: str | None = None
    ) -> dict:
        """Start (or resume, or join) fetching a blob; answer at once.

        ``seed_site``: the site whose nodes the client seeds, if only one.
        """
        parsed = Offer.from_msg(offer)
        if self.cache.has_archive(parsed.id):
            return {"complete": True, "have": parsed.table.count}
        peers = _peers_from_msg(peers or [])
        check_site(seed_site)
        if (parsed.id, parsed.table.digest) not in self.downloads:
            self._check_room(parsed)
        download = self.start(parsed, peers)
        download.seed_site = seed_site
        return {"complete": download.complete, "have": download.count}

    async def put(self, id: str, digest: str, index: int, data) -> bool:
        """A piece pushed by the client into a download started by ``offer``."""
        download = self.downloads.get((check_id(id), _check_digest(digest)))
        if download is None:
            raise ValueError(f"no download of {id} here: offer it first")
        _check_index(index, download.table)
        await download.opened.wait()
        if download.fd is None:  # ended meanwhile: complete, or failed
            return bool(download.have[index])
        return await download.accept(index, data, "client")

    async def wait(self, id: str, digest: str, timeout: float = 1.0) -> dict:
        """The state of a download, once complete or after ``timeout`` seconds."""
        key = (check_id(id), _check_digest(digest))
        download = self.downloads.get(key)
        if download is None:
            if self.cache.has_archive(id):
                return {"complete": True, "error": None}
            return {"complete": False, "error": f"no download of {id} here"}
        if not isinstance(timeout, int | float) or not 0 <= timeout <= 60:
            raise ValueError(f"timeout out of bounds: {timeout!r}")
        try:
            await asyncio.wait_for(download.done.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return download.state()

    async def piece(self, id: str, digest: str, piece_size: int, index: int):
        """One verified piece of a blob this nanny holds, for a peer."""
        key = (check_id(id), _check_digest(digest))
        if not _int_in(piece_size, MIN_PIECE_SIZE, MAX_PIECE_SIZE):
            raise ValueError(f"piece size out of bounds: {piece_size!r}")
        source = await self._source(key, piece_size)
        if source is None:
            return _MISSING
        path, table = source
        _check_index(index, table)
        download = self.downloads.get(key)
        if download is not None and path == download.path:
            if not download.have[index]:
                return _MISSING
        if self._serving >= SERVE_SLOTS:
            return _BUSY
        self._serving += 1
        try:
            offset, length = table.span(index)
            await self._limit.take(length)
            try:
                data = await asyncio.to_thread(_pread, path, offset, length)
            except FileNotFoundError:
                # A download handed to the cache this very moment: same bytes.
                archive = self.cache.archive_path(key[0])
                data = await asyncio.to_thread(_pread, archive, offset, length)
        finally:
            self._serving -= 1
        return {"data": to_serialize(data)}

    async def have(
        self, id: str, digest: str, piece_size: int, known: int = -1
    ) -> dict:
        """Which pieces this nanny holds; waits a little for news beyond ``known``."""
        key = (check_id(id), _check_digest(digest))
        if not _int_in(piece_size, MIN_PIECE_SIZE, MAX_PIECE_SIZE):
            raise ValueError(f"piece size out of bounds: {piece_size!r}")
        if not _int_in(known, -1, 1 << 30):
            raise ValueError(f"known out of bounds: {known!r}")
        download = self.downloads.get(key)
        if download is not None and not download.done.is_set():
            if download.count <= known:
                try:
                    await asyncio.wait_for(download.news.wait(), HAVE_WAIT)
                except asyncio.TimeoutError:
                    pass
            # Complete but not yet handed to the cache: it serves all the same.
            return {"complete": download.complete, "have": download.bitmap()}
        source = await self._source(key, piece_size)
        return {"complete": source is not None, "have": None}

    def _check_room(self, offer: Offer) -> None:
        """Refuse a blob larger than the free disk up front, not once it is full.

        The downloads under way here count: what they still have to write is
        not free.
        """
        size = offer.table.size
        coming = sum(
            d.table.size
            - sum(d.table.span(i)[1] for i in range(d.table.count) if d.have[i])
            for d in self.downloads.values()
            if not d.done.is_set()
        )
        free = shutil.disk_usage(self.cache.root).free - coming
        if size > free:
            raise EnvshipError(
                offer.name,
                f"its archive ({format_bytes(size)}) does not fit on the disk of "
                f"this node's cache {self.cache.root} ({format_bytes(max(free, 0))} "
                "free, beyond the downloads under way)",
                "free disk space on the node, or set envship.cache.directory "
                "to a larger disk",
            )

    # -- serving helpers -----------------------------------------------------------

    async def _source(self, key: tuple[str, str], piece_size: int):
        """(path, table) to serve ``key`` from, or None if this node lacks it."""
        id, digest = key
        download = self.downloads.get(key)
        if download is not None and not download.done.is_set():
            # Still arriving, or complete and being handed to the cache.
            return download.path, download.table
        path = self.cache.archive_path(id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        cache_key = (id, piece_size, st.st_ino)
        table = self._tables.get(cache_key)
        if table is None:
            # Complete archives are served for any piece size, once their
            # table (xxh3 at ~10 GB/s) is the one asked for.
            table = await asyncio.to_thread(PieceTable.of_file, path, piece_size)
            self._tables[cache_key] = table
        return (path, table) if table.digest == digest else None


class _RateLimit:
    """A token bucket: ``await take(n)`` keeps the average at ``rate`` bytes/s."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.next_free = 0.0

    async def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)


def _pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _parse_rate(value) -> float | None:
    if value in (None, "", 0):
        return None
    return (
        float(dask.utils.parse_bytes(value)) if isinstance(value, str) else float(value)
    )
