"""A nanny's side of transfers: receive pushes, serve pieces, answer who holds what.

:class:`BlobServer` is a :class:`.fetch.Fetcher` with the handlers the client
and peers call, installed on the nanny as ``envship_<name>``: ``offer``,
``put``, ``wait``, ``piece`` and ``have``. A piece is served as soon as it is
verified, from a download under way or from the complete archive in the node
cache, at most ``envship.transfer.serve-slots`` at once and within
``envship.transfer.max-rate``.

Every handler takes ids, digests, indices and bytes from other processes, as a
typed request of :mod:`.messages` whose every value was checked for type and
bounds before anything is read, written or allocated; it answers a typed
answer of the same module.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.utils
from dask.utils import format_bytes
from distributed.comm import Comm
from distributed.core import Status as CommStatus

from envship import config, policy
from envship.errors import EnvshipError
from envship.ids import Digest, EnvId
from envship.manifest import ThinManifest
from envship.messages import serve

from .fetch import HAVE_WAIT, Fetcher
from .messages import (
    Have,
    HaveAnswer,
    OfferAnswer,
    OfferRequest,
    PieceAnswer,
    PieceRequest,
    Put,
    Wait,
    WaitAnswer,
)
from .pieces import Offer, PieceTable, check_index
from .store import BlobStore

#: Piece tables of held archives a nanny keeps (one per archive and piece size).
MAX_TABLES = 8

_MISSING = PieceAnswer(missing=True)
_BUSY = PieceAnswer(busy=True)


class BlobServer(Fetcher):
    """A nanny's side of transfers: its downloads, and the handlers others call.

    Handlers (installed on the nanny as ``envship_<name>``): ``offer``,
    ``put``, ``wait``, ``piece`` and ``have``. Parameters: those of
    :class:`.fetch.Fetcher`.
    """

    def __init__(self, cache: BlobStore, rpc, address: str, site: str | None = None):
        super().__init__(cache, rpc, address, site)
        #: Piece tables of held archives, least recently used first (at
        #: most MAX_TABLES: a peer may ask for any piece size).
        self._tables: OrderedDict[tuple[str, int, int], PieceTable] = OrderedDict()
        self._hashing: dict[tuple[str, int, int], asyncio.Future[PieceTable]] = {}
        self._serving = 0
        #: Pieces it sends at once; more requests are answered "busy".
        self.serve_slots = max(1, int(config.get("transfer.serve-slots")))
        self._limit = _RateLimit(_parse_rate(config.get("transfer.max-rate")))

    # -- handlers ----------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The comm handlers to install on the nanny: ``envship_offer`` and the others."""
        requests: list[tuple[Callable[..., Any], type]] = [
            (self.offer, OfferRequest),
            (self.put, Put),
            (self.wait, Wait),
            (self.have, Have),
        ]
        handlers = {
            f"envship_{method.__name__}": serve(method, request)
            for method, request in requests
        }
        handlers["envship_piece"] = self.piece
        return handlers

    async def offer(self, request: OfferRequest) -> OfferAnswer:
        """Start (or resume, or join) fetching a blob; answer at once.

        ``seed_site``: the site whose nodes the client seeds, if only one.
        """
        offer = request.offer
        manifest = offer.manifest
        env_id = manifest.thin_of if isinstance(manifest, ThinManifest) else offer.id
        policy.check(offer.name, env_id)
        if self.cache.has_archive(offer.id):
            return OfferAnswer(True, offer.table.count)
        if (offer.id, offer.table.digest) not in self.downloads:
            self._check_room(offer)
        download = self.start(offer, list(request.peers))
        download.seed_site = request.seed_site
        return OfferAnswer(download.complete, download.count)

    async def put(self, request: Put) -> bool:
        """A piece pushed by the client into a download started by ``offer``."""
        index = request.index
        download = self.downloads.get((request.id, request.digest))
        if download is None:
            raise ValueError(f"no download of {request.id} here: offer it first")
        check_index(index, download.table)
        await download.opened.wait()
        if download.fd is None:  # ended meanwhile: complete, or failed
            return bool(download.have[index])
        return await download.accept(index, request.data, "client")

    async def wait(self, request: Wait) -> WaitAnswer:
        """The state of a download, once complete or after ``timeout`` seconds."""
        download = self.downloads.get((request.id, request.digest))
        if download is None:
            if self.cache.has_archive(request.id):
                return WaitAnswer(complete=True)
            return WaitAnswer(False, f"no download of {request.id} here")
        try:
            await asyncio.wait_for(download.done.wait(), request.timeout)
        except asyncio.TimeoutError:
            pass
        return download.state()

    async def piece(self, comm: Comm, **msg: Any) -> Any:
        """``envship_piece``: one verified piece of a blob this nanny holds, for a peer.

        It writes the piece to ``comm`` itself, so that its serve slot covers
        the send and not only the read: a nanny sends ``serve-slots`` pieces
        at once at most, each at a fair share of its link, and answers more
        askers "busy", who ask another holder meanwhile. (Serving all at
        once, the one holder of a new piece would send it to every asker
        together, and none would have it to pass on until all had it.)
        """
        request = PieceRequest.from_msg(msg)
        key, index = (request.id, request.digest), request.index
        source = await self._source(key, request.piece_size)
        if source is None:
            return _MISSING.to_msg()
        path, table = source
        check_index(index, table)
        download = self.downloads.get(key)
        if download is not None and path == download.path:
            if not download.have[index]:
                return _MISSING.to_msg()
        if self._serving >= self.serve_slots:
            return _BUSY.to_msg()
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
            await comm.write(PieceAnswer(data).to_msg())
        finally:
            self._serving -= 1
        return CommStatus.dont_reply

    async def have(self, request: Have) -> HaveAnswer:
        """Which pieces this nanny holds; waits a little for news beyond ``known``."""
        key = (request.id, request.digest)
        download = self.downloads.get(key)
        if download is not None and not download.done.is_set():
            if download.count <= request.known:
                try:
                    await asyncio.wait_for(download.news.wait(), HAVE_WAIT)
                except asyncio.TimeoutError:
                    pass
            # Complete but not yet handed to the cache: it serves all the same.
            return HaveAnswer(download.complete, download.bitmap())
        source = await self._source(key, request.piece_size)
        return HaveAnswer(source is not None)

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

    async def _source(self, key: tuple[EnvId, Digest], piece_size: int):
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
        kept = self._tables.get(cache_key)
        if kept is not None:
            self._tables.move_to_end(cache_key)
            table = kept
        else:
            # Complete archives are served for any piece size, once their
            # table (xxh3 at ~10 GB/s) is the one asked for: hashed once for
            # all who ask at the same time, and kept among the last few.
            hashing = self._hashing.get(cache_key)
            if hashing is None:
                hashing = asyncio.ensure_future(
                    asyncio.to_thread(PieceTable.of_file, path, piece_size)
                )
                self._hashing[cache_key] = hashing
                hashing.add_done_callback(lambda _: self._hashing.pop(cache_key, None))
            table = await asyncio.shield(hashing)
            self._tables[cache_key] = table
            while len(self._tables) > MAX_TABLES:
                self._tables.popitem(last=False)
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
