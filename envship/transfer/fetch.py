"""The node side of transfers: receive pushes, fetch from peers, serve pieces.

Every fetching node pulls the pieces it lacks from any peer that holds them,
including peers still downloading (a piece is served as soon as it is
verified), rarest piece first, spreading its requests over its peers and
preferring peers of its own site (dask config ``envship.site``). A peer that
dies, stalls or sends a bad piece is dropped for that blob.

Pieces go straight to a partial file that the node cache names
(``BlobStore.partial_path``, one per node, guarded by the cache's fetch lock); a
download that is interrupted resumes from the verified pieces already there;
only a complete, verified blob is handed to the cache
(``EnvCache.adopt_archive``). No process holds a whole blob in memory.

Every handler takes ids, digests, indices and bytes from other processes: each
is checked for type and bounds before anything is read, written or allocated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dask.utils
from dask.utils import format_bytes
from distributed.protocol import to_serialize

from envship import config
from envship.archive import check_id
from envship.errors import EnvshipError

from .choice import Limits, NodeView, PeerView, choose
from .pieces import (
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    Offer,
    Peer,
    PieceTable,
    _check_digest,
    _check_index,
    _int_in,
    _peers_from_msg,
    check_site,
)
from .store import BlobStore

logger = logging.getLogger("envship.transfer")

#: Pieces a nanny serves at once; more requests are answered "busy".
SERVE_SLOTS = 6
#: Seconds a ``have`` request waits for news before answering.
HAVE_WAIT = 1.0

_MISSING = {"missing": True}
_BUSY = {"busy": True}


# -- one download on a node --------------------------------------------------------


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


@dataclass
class _PeerState:
    peer: Peer
    have: bytearray | None = None
    complete: bool = False
    in_flight: int = 0
    busy_until: float = 0.0
    dropped: str | None = None
    poller: asyncio.Task | None = None


@dataclass
class Download:
    """The pieces of one blob arriving on one node, from the client and peers."""

    offer: Offer
    path: Path
    node_site: str | None
    #: The site the client seeds, if it seeds one: its nodes never fetch across.
    seed_site: str | None = None
    have: bytearray = field(init=False)
    received: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.have = bytearray(self.table.count)
        self.peers: dict[str, _PeerState] = {}
        self.changed = asyncio.Event()  # wakes the fetch loop
        self.news = asyncio.Event()  # replaced on every new piece: for `have`
        self.opened = asyncio.Event()  # the partial file is ready for pieces
        self.done = asyncio.Event()
        self.in_flight: set[int] = set()
        self.waiting_since: dict[int, float] = {}
        self.fd: int | None = None

    @property
    def table(self) -> PieceTable:
        return self.offer.table

    @property
    def count(self) -> int:
        return sum(self.have)

    @property
    def complete(self) -> bool:
        return self.count == self.table.count

    def add_peers(self, peers: Iterable[Peer], me: str) -> None:
        for peer in peers:
            if peer.address != me and peer.address not in self.peers:
                self.peers[peer.address] = _PeerState(peer)
        self.changed.set()

    def unavailable(self) -> list[int]:
        """Pieces that this node lacks and no live peer it would ask holds.

        Nodes of the seeded site ask only their own site: what only other
        sites hold is unavailable to them, and the client sends it again.
        """
        own_site_only = self.seed_site is not None and self.seed_site == self.node_site
        live = [
            p
            for p in self.peers.values()
            if not p.dropped and (not own_site_only or p.peer.site == self.node_site)
        ]
        return [
            i
            for i in range(self.table.count)
            if not self.have[i]
            and i not in self.in_flight
            and not any(p.complete or (p.have and p.have[i]) for p in live)
        ]

    def state(self) -> dict:
        """For whoever waits: ``complete`` once the blob is in the node cache."""
        return {
            "complete": self.done.is_set() and self.error is None,
            "have": self.count,
            "count": self.table.count,
            "received": dict(self.received),
            "rejected": dict(self.rejected),
            "dropped": {a: p.dropped for a, p in self.peers.items() if p.dropped},
            "unavailable": [] if self.complete else self.unavailable(),
            "error": self.error,
        }

    def bitmap(self) -> bytes:
        return bytes(self.have)

    async def accept(self, index: int, data, source: str) -> bool:
        """Verify and write one piece; False (and a strike) if it is bad."""
        data = bytes(data) if not isinstance(data, bytes) else data
        if self.have[index]:
            return True
        if not self.table.verify(index, data):
            self.rejected[source] = self.rejected.get(source, 0) + 1
            logger.warning(
                "envship: piece %d of %s from %s failed verification",
                index,
                self.offer.name,
                source,
            )
            return False
        offset, _ = self.table.span(index)
        try:
            await asyncio.to_thread(_pwrite_all, self.fd, data, offset)
        except OSError as e:
            raise _disk_error(self, self.path.parent, e) from e
        if not self.have[index]:
            self.have[index] = 1
            self.received[source] = self.received.get(source, 0) + len(data)
            self.changed.set()
            news, self.news = self.news, asyncio.Event()
            news.set()
        return True


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- the node side: handlers and the fetch loop -------------------------------------


class BlobServer:
    """A nanny's side of transfers: receive pushes, fetch from peers, serve pieces.

    Handlers (installed on the nanny as ``envship_<name>``): ``offer``,
    ``put``, ``wait``, ``piece`` and ``have``.

    Parameters
    ----------
    cache : BlobStore
        The node cache that partial and complete blobs live in
        (``envship.node.cache.EnvCache``; this module sits below the node side
        and uses only what :class:`BlobStore` names).
    rpc : callable
        A connection pool (``nanny.rpc``) to reach peers.
    address : str
        This nanny's address, so it never fetches from itself.
    site : str, optional
        This node's site label; peers of the same site are asked first.
    """

    def __init__(self, cache: BlobStore, rpc, address: str, site: str | None = None):
        self.cache = cache
        self.rpc = rpc
        self.address = address
        self.site = site
        self.downloads: dict[tuple[str, str], Download] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._tables: dict[tuple[str, int, int], PieceTable] = {}
        self._serving = 0
        max_rate = config.get("transfer.max-rate")
        self._limit = _RateLimit(_parse_rate(max_rate))
        self.piece_timeout = dask.utils.parse_timedelta(
            config.get("transfer.piece-timeout")
        )
        self.limits = Limits(piece_timeout=self.piece_timeout)
        self._rng = random.Random()
        #: Called with a download and "started", "complete" or "failed".
        self.on_event: Callable[[Download, str], None] = lambda d, event: None

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

    # -- fetching ----------------------------------------------------------------

    def start(self, offer: Offer, peers: list[Peer]) -> Download:
        """The download of ``offer`` on this nanny, started if needed."""
        key = (offer.id, offer.table.digest)
        download = self.downloads.get(key)
        if download is None or download.done.is_set():  # none, or one that ended
            path = self.cache.partial_path(offer.id, offer.table.digest)
            download = self.downloads[key] = Download(offer, path, self.site)
            task = self._tasks[key] = asyncio.create_task(self._run(download))
            # Also when it is cancelled before it ever ran (no `finally` then).
            task.add_done_callback(lambda _: _ended(download))
        download.add_peers(peers, self.address)
        return download

    async def fetch(
        self,
        offer: Offer,
        peers: list[Peer],
        stall: float,
        more_peers: Callable[[], Awaitable[list[Peer]]] | None = None,
    ) -> dict:
        """Fetch ``offer`` from peers alone (no client); its state when done.

        ``more_peers``, if given, is asked for the nodes that hold it now
        whenever pieces lack a live source, so that a long fetch also uses
        nodes that got it after it began.

        Raises
        ------
        EnvshipError
            When the blob cannot be completed: pieces that no live peer holds
            for ``stall`` seconds, or a local failure.
        """
        if self.cache.has_archive(offer.id):
            return {"complete": True}
        if not [p for p in peers if p.address != self.address]:
            raise EnvshipError(
                offer.name,
                "this node lacks it and no node that holds it is left",
                "call use_environment again so that the client sends it",
            )
        download = self.start(offer, peers)
        last, since = download.count, time.monotonic()
        while not download.done.is_set():
            try:
                await asyncio.wait_for(download.done.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            if download.count != last:
                last, since = download.count, time.monotonic()
                continue
            if not download.unavailable():
                continue
            if more_peers is not None:
                download.add_peers(await more_peers(), self.address)
            if time.monotonic() - since > stall:
                self.cancel(download, "no live peer holds the missing pieces")
        if download.error:
            raise EnvshipError(
                offer.name,
                f"this node could not get it: {download.error} "
                f"({download.count} of {download.table.count} pieces; peers "
                f"tried: {', '.join(download.peers) or 'none'})",
                "call use_environment again from a client that holds it",
            )
        return download.state()

    def cancel(self, download: Download, reason: str) -> None:
        key = (download.offer.id, download.table.digest)
        task = self._tasks.get(key)
        if download.error is None:
            download.error = reason
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _run(self, download: Download) -> None:
        key = (download.offer.id, download.table.digest)
        lock = self.cache.fetch_lock(download.offer.id)
        locked = False
        try:
            # Polled, not a blocking acquire in a thread: cancellable, and
            # the nannies of a node that wait here cost nothing.
            while not (locked := _try_acquire(lock)):
                await asyncio.sleep(0.2)
            if self.cache.has_archive(download.offer.id):
                # Another nanny of this node got it meanwhile.
                download.have[:] = b"\1" * download.table.count
            else:
                await self._download(download)
        except asyncio.CancelledError:
            download.error = download.error or "cancelled"
        except EnvshipError as e:
            download.error = e.problem
        except Exception as e:  # a full disk, a bug: report it to whoever waits
            logger.exception("envship: download of %s failed", download.offer.name)
            download.error = f"{type(e).__name__}: {e}"
        finally:
            for p in download.peers.values():
                if p.poller is not None:
                    p.poller.cancel()
            if download.fd is not None:
                os.close(download.fd)
                download.fd = None
            if locked:
                lock.release()
            download.opened.set()
            download.done.set()
            self._tasks.pop(key, None)
            if download.error is not None:
                self.on_event(download, "failed")
            # Keep a failed download's state until its waiters have read it;
            # a later offer starts a fresh one that resumes the partial file.
            loop = asyncio.get_running_loop()
            loop.call_later(30, self._forget, key, download)

    def _forget(self, key, download: Download) -> None:
        if self.downloads.get(key) is download:
            del self.downloads[key]

    async def _download(self, download: Download) -> None:
        table = download.table
        try:
            download.fd = os.open(download.path, os.O_RDWR | os.O_CREAT, 0o600)
            await asyncio.to_thread(_resume, download)
        except OSError as e:
            raise _disk_error(download, self.cache.root, e) from e
        download.opened.set()
        download.changed.set()
        self.on_event(download, "started")
        requests: set[asyncio.Task] = set()
        try:
            while not download.complete:
                for p in download.peers.values():
                    if p.poller is None and not p.dropped:
                        p.poller = asyncio.create_task(self._poll(download, p))
                for index, p in self._choose(download):
                    request = self._request(download, p, index)
                    requests.add(asyncio.create_task(request))
                download.changed.clear()
                changed = asyncio.create_task(download.changed.wait())
                done, _ = await asyncio.wait(
                    {changed, *requests},
                    timeout=0.2,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                changed.cancel()
                for task in done - {changed}:
                    requests.discard(task)
                    task.result()  # a local failure (disk) ends the download
        finally:
            for task in requests:
                task.cancel()
        try:
            await asyncio.to_thread(os.fsync, download.fd)
        except OSError as e:
            raise _disk_error(download, self.cache.root, e) from e
        os.close(download.fd)
        download.fd = None
        await asyncio.to_thread(
            self.cache.adopt_archive,
            download.offer.id,
            download.path,
            download.offer.manifest,
        )
        self.on_event(download, "complete")
        logger.info(
            "envship: %s arrived (%d pieces; from %s)",
            download.offer.name,
            table.count,
            ", ".join(f"{s}: {n} B" for s, n in download.received.items()) or "disk",
        )

    def _choose(self, download: Download) -> list[tuple[int, _PeerState]]:
        """Requests to make now (:func:`.choice.choose`), counted in flight."""
        node = NodeView(
            self.address,
            download.have,
            site=download.node_site,
            seed_site=download.seed_site,
            in_flight=frozenset(download.in_flight),
            waiting_since=download.waiting_since,
        )
        peers = [
            PeerView(
                address,
                p.peer.site,
                p.have,
                p.complete,
                p.in_flight,
                p.busy_until,
                p.dropped is not None,
            )
            for address, p in download.peers.items()
        ]
        choice = choose(node, peers, time.monotonic(), self._rng, self.limits)
        download.waiting_since = choice.waiting_since
        chosen = []
        for index, address in choice.requests:
            p = download.peers[address]
            p.in_flight += 1
            download.in_flight.add(index)
            chosen.append((index, p))
        return chosen

    async def _request(self, download: Download, p: _PeerState, index: int) -> None:
        """Ask ``p`` for piece ``index``; a peer's fault drops it, a local one raises."""
        d = download
        try:
            try:
                reply = await self._ask_piece(d, p, index)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError) as e:
                self._drop(d, p, f"unreachable or stalled ({type(e).__name__})")
                return
            except Exception as e:  # the peer raised: no source for this blob
                self._drop(d, p, f"failed: {e}")
                return
            if not isinstance(reply, dict):
                self._drop(d, p, "answered nonsense")
            elif reply.get("busy"):
                p.busy_until = time.monotonic() + self.limits.busy_backoff
            elif reply.get("missing"):
                if p.have is not None:
                    p.have[index] = 0
                p.complete = False
            elif not await d.accept(index, reply.get("data", b""), p.peer.address):
                self._drop(d, p, f"sent a bad piece {index}")
        finally:
            p.in_flight -= 1
            d.in_flight.discard(index)
            d.changed.set()

    async def _ask_piece(self, d: Download, p: _PeerState, index: int):
        return await asyncio.wait_for(
            self.rpc(p.peer.address).envship_piece(
                id=d.offer.id,
                digest=d.table.digest,
                piece_size=d.table.piece_size,
                index=index,
            ),
            self.piece_timeout,
        )

    async def _poll(self, download: Download, p: _PeerState) -> None:
        """Keep ``p.have`` current (long polls) until the download ends."""
        d = download
        known = -1
        while not d.complete and not p.dropped and not p.complete:
            try:
                reply = await asyncio.wait_for(
                    self.rpc(p.peer.address).envship_have(
                        id=d.offer.id,
                        digest=d.table.digest,
                        piece_size=d.table.piece_size,
                        known=known,
                    ),
                    HAVE_WAIT + self.piece_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._drop(d, p, f"unreachable ({type(e).__name__})")
                return
            if not isinstance(reply, dict):
                self._drop(d, p, "answered nonsense")
                return
            have = reply.get("have")
            if reply.get("complete"):
                p.complete = True
            elif isinstance(have, bytes) and len(have) == d.table.count:
                p.have = bytearray(have)
                known = sum(p.have)
            else:
                p.have = None
                await asyncio.sleep(HAVE_WAIT)  # it holds nothing yet
            d.changed.set()

    def _drop(self, download: Download, p: _PeerState, reason: str) -> None:
        if p.dropped is None:
            p.dropped = reason
            logger.info(
                "envship: not fetching %s from %s any more: %s",
                download.offer.name,
                p.peer.address,
                reason,
            )
            if p.poller is not None:
                p.poller.cancel()


def _ended(download: Download) -> None:
    if download.error is None and not download.complete:
        download.error = "cancelled"
    download.opened.set()
    download.done.set()


def _resume(download: Download) -> None:
    """Mark the pieces a previous, interrupted download already wrote."""
    size = os.fstat(download.fd).st_size
    table = download.table
    for i in range(table.count):
        offset, length = table.span(i)
        if offset + length > size:
            break
        if table.verify(i, os.pread(download.fd, length, offset)):
            download.have[i] = 1
            download.received["disk"] = download.received.get("disk", 0) + length


def _disk_error(download: Download, root: Path, e: OSError) -> EnvshipError:
    return EnvshipError(
        download.offer.name,
        f"could not write its archive into this node's cache {root}: {e}",
        "free disk space on the node, or set envship.cache.directory to a larger disk",
    )


def _try_acquire(lock) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


def _parse_rate(value) -> float | None:
    if value in (None, "", 0):
        return None
    return (
        float(dask.utils.parse_bytes(value)) if isinstance(value, str) else float(value)
    )
