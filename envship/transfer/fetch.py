"""The fetch loop of a node: pull the pieces of a blob from peers.

Every fetching node pulls the pieces it lacks from any peer that holds them,
including peers still downloading (a piece is served as soon as it is
verified), rarest piece first, spreading its requests over its peers and
preferring peers of its own site (dask config ``envship.site``): which piece
from which peer is :func:`.choice.choose`'s to say. A peer that dies, stalls
or sends a bad piece is dropped for that blob.

One nanny of a node downloads a blob at a time (the cache's fetch lock); only
a complete, verified blob is handed to the cache (``BlobStore.adopt_archive``).
No process holds a whole blob in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable

import dask.utils

from envship import config
from envship.errors import CorruptArchiveError, EnvshipError

from .choice import Limits, NodeView, PeerView, choose, late_pieces
from .download import Download, PeerState, disk_error, resume
from .messages import Have, HaveAnswer, PieceAnswer, PieceRequest, WaitAnswer
from .pieces import Offer, Peer
from .store import BlobStore

logger = logging.getLogger("envship.transfer")

#: Seconds a ``have`` request waits for news before answering.
HAVE_WAIT = 1.0
#: Seconds without a new piece, while no polled peer holds some piece this
#: node lacks, before it polls ``peers-polled`` more of each site.
POLL_MORE_AFTER = 1.0


class Fetcher:
    """The downloads of one nanny, and the loop that fetches each from peers.

    Parameters
    ----------
    cache : BlobStore
        The node cache that partial and complete blobs live in
        (``envship.node.cache.EnvCache``; transfer sits below the node side
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
        self.piece_timeout = dask.utils.parse_timedelta(
            config.get("transfer.piece-timeout")
        )
        self.in_flight = int(dask.utils.parse_bytes(config.get("transfer.in-flight")))
        self.peers_polled = int(config.get("transfer.peers-polled"))
        self._rng = random.Random()
        #: Called with a download and "started", "complete" or "failed".
        self.on_event: Callable[[Download, str], None] = lambda d, event: None

    def start(self, offer: Offer, peers: list[Peer]) -> Download:
        """The download of ``offer`` on this nanny, started if needed."""
        key = (offer.id, offer.table.digest)
        download = self.downloads.get(key)
        if download is None or download.done.is_set():  # none, or one that ended
            path = self.cache.partial_path(offer.id, offer.table.digest)
            download = self.downloads[key] = Download(offer, path, self.site)
            download.limits = Limits.for_pieces(
                self.piece_timeout, offer.table.piece_size, self.in_flight
            )
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
    ) -> WaitAnswer:
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
            return WaitAnswer(complete=True)
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
        except CorruptArchiveError as e:  # complete, and not its id
            download.error, download.not_its_id = e.problem, True
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
                logger.log(
                    logging.INFO if download.error == "cancelled" else logging.WARNING,
                    "envship: could not get %s (%s): %s (%d of %d pieces)",
                    download.offer.name,
                    download.offer.id[:12],
                    download.error,
                    download.count,
                    download.table.count,
                )
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
            fd = download.fd = os.open(download.path, os.O_RDWR | os.O_CREAT, 0o600)
            await asyncio.to_thread(resume, download, fd)
        except OSError as e:
            raise disk_error(download, self.cache.root, e) from e
        download.opened.set()
        download.changed.set()
        self.on_event(download, "started")
        resumed = download.received.get("disk", 0)
        logger.info(
            "envship: receiving %s (%s): %s in %d pieces%s; peers: %s",
            download.offer.name,
            download.offer.id[:12],
            dask.utils.format_bytes(table.size),
            table.count,
            f", {dask.utils.format_bytes(resumed)} here already" if resumed else "",
            ", ".join(download.peers) or "none yet (the client sends it)",
        )
        requests: set[asyncio.Task] = set()
        idle = dask.utils.parse_timedelta(config.get("transfer.idle-timeout"))
        count, progress = download.count, time.monotonic()
        try:
            while not download.complete:
                if download.count != count:
                    count, progress = download.count, time.monotonic()
                elif time.monotonic() - progress > idle:
                    raise EnvshipError(
                        download.offer.name,
                        f"no piece arrived for {idle:g} s (the client stopped "
                        "sending, and no peer has them)",
                        "call use_environment again: the pieces here are kept",
                    )
                self._start_polls(download, count, progress)
                for index, p in self._choose(download):
                    request = self._request(download, p, index)
                    requests.add(asyncio.create_task(request))
                download.changed.clear()
                changed = asyncio.create_task(download.changed.wait())
                wake = 0.2
                if download.late_at is not None:  # a request becomes late then
                    wake = min(wake, max(download.late_at - time.monotonic(), 0.005))
                done, _ = await asyncio.wait(
                    {changed, *requests},
                    timeout=wake,
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
            await asyncio.to_thread(os.fsync, fd)
        except OSError as e:
            raise disk_error(download, self.cache.root, e) from e
        os.close(fd)
        download.fd = None
        await asyncio.to_thread(
            self.cache.adopt_archive,
            download.offer.id,
            download.path,
            download.offer.manifest,
        )
        self.on_event(download, "complete")
        seconds = time.time() - download.started
        fetched = sum(n for s, n in download.received.items() if s != "disk")
        logger.info(
            "envship: %s (%s) arrived: %s in %.1f s (%s/s), from %s",
            download.offer.name,
            download.offer.id[:12],
            dask.utils.format_bytes(table.size),
            seconds,
            dask.utils.format_bytes(int(fetched / max(seconds, 1e-3))),
            ", ".join(
                f"{source} {dask.utils.format_bytes(n)}"
                for source, n in sorted(download.received.items())
            )
            or "disk",
        )

    def _start_polls(self, download: Download, count: int, since: float) -> None:
        """Poll the peers :meth:`Download.poll_more` picks; more when stuck.

        Stuck: no new piece for ``POLL_MORE_AFTER`` seconds while no polled
        peer holds some piece this node lacks (checked once per that time).
        """
        now = time.monotonic()
        more = False
        if now - since >= POLL_MORE_AFTER and now >= download.poll_more_at:
            download.poll_more_at = now + POLL_MORE_AFTER
            more = bool(download.unavailable())
        if more or download.poll_due:  # stuck, or peers came or were dropped
            download.poll_due = False
            for p in download.poll_more(self.peers_polled, self._rng, more=more):
                p.poller = asyncio.create_task(self._poll(download, p))

    def _choose(self, download: Download) -> list[tuple[int, PeerState]]:
        """Requests to make now (:func:`.choice.choose`), counted in flight."""
        now = time.monotonic()
        late, download.late_at = late_pieces(
            download.asked, now, download.typical, download.limits
        )
        node = NodeView(
            self.address,
            download.have,
            site=download.node_site,
            seed_site=download.seed_site,
            in_flight=frozenset(download.in_flight),
            waiting_since=download.waiting_since,
            late=late,
            crossers=(
                download.crossers(self.address)
                if download.node_site is not None
                else None
            ),
        )
        # Peers that said nothing of what they hold are never candidates.
        peers = [
            PeerView(
                address,
                site=p.peer.site,
                have=p.have,
                complete=p.complete,
                in_flight=p.in_flight,
                busy_until=p.busy_until,
            )
            for address, p in download.peers.items()
            if p.dropped is None and (p.complete or p.have is not None)
        ]
        choice = choose(node, peers, now, self._rng, download.limits)
        download.waiting_since = choice.waiting_since
        chosen = []
        for index, address in choice.requests:
            p = download.peers[address]
            p.in_flight += 1
            download.asking(index, address, now)
            chosen.append((index, p))
        return chosen

    async def _request(self, download: Download, p: PeerState, index: int) -> None:
        """Ask ``p`` for piece ``index``; a peer's fault drops it, a local one raises."""
        d = download
        came = False  # the piece, first: its time counts for ``typical``
        try:
            try:
                msg = await self._ask_piece(d, p, index)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError) as e:
                self._drop(d, p, f"unreachable or stalled ({type(e).__name__})")
                return
            except Exception as e:  # the peer raised: no source for this blob
                self._drop(d, p, f"failed: {e}")
                return
            try:
                reply = PieceAnswer.from_msg(msg)
            except ValueError:
                self._drop(d, p, "answered nonsense")
                return
            if reply.busy:
                p.busy_until = d.limits.busy_until(time.monotonic(), d.typical)
            elif reply.missing or reply.data is None:
                if p.have is not None:
                    p.have[index] = 0
                p.complete = False
            else:
                first = not d.have[index]
                if not await d.accept(index, reply.data, p.peer.address):
                    self._drop(d, p, f"sent a bad piece {index}")
                else:
                    came = first
        finally:
            p.in_flight -= 1
            d.answered(index, p.peer.address, time.monotonic(), came=came)
            d.changed.set()

    async def _ask_piece(self, d: Download, p: PeerState, index: int):
        request = PieceRequest(d.offer.id, d.table.digest, d.table.piece_size, index)
        return await asyncio.wait_for(
            self.rpc(p.peer.address).envship_piece(**request.to_msg()),
            self.piece_timeout,
        )

    async def _poll(self, download: Download, p: PeerState) -> None:
        """Keep ``p.have`` current (long polls) until the download ends."""
        d = download
        known = -1
        while not d.complete and not p.dropped and not p.complete:
            request = Have(d.offer.id, d.table.digest, d.table.piece_size, known)
            try:
                msg = await asyncio.wait_for(
                    self.rpc(p.peer.address).envship_have(**request.to_msg()),
                    HAVE_WAIT + self.piece_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._drop(d, p, f"unreachable ({type(e).__name__})")
                return
            try:
                reply = HaveAnswer.from_msg(msg)
            except ValueError:
                self._drop(d, p, "answered nonsense")
                return
            have = reply.have
            if reply.complete:
                p.complete = True
            elif have is not None and len(have) == d.table.count:
                p.have = bytearray(have)
                known = sum(p.have)
            else:
                p.have = None
                await asyncio.sleep(HAVE_WAIT)  # it holds nothing yet
            d.changed.set()

    def _drop(self, download: Download, p: PeerState, reason: str) -> None:
        if download.drop(p, reason):
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


def _try_acquire(lock) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True
